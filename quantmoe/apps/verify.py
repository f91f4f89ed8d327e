"""``quantmoe verify DIR``: the checks live in ``quantmoe.stages.verify``, one layer down, because
``quantmoe push`` (``apps.publish``) runs them before publishing and apps do not import each other."""

from ..stages.verify import VerifyReport, expected_linears, gptq_layout, verify

__all__ = ["VerifyReport", "expected_linears", "gptq_layout", "verify"]
