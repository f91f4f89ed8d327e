"""The peer quantizers the harness compares quantmoe with: one row per tool.

Each tool runs in a virtualenv of its own, created here with ``python3 -m venv`` and pip.
torch is pinned to 2.13.0 (the CPU build) in the same pip command as the tool, so pip
never pulls a CUDA torch; the tool and transformers are pinned to the versions these
results were made with (llmcompressor 0.14.0.1 requires transformers 5.15-5.17 and
compressed-tensors 0.19.0; gptqmodel 7.7 requires torch>=2.14.1, so 7.6.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class PeerTool:
    name: str                  # also the venv folder name and the result key
    packages: tuple[str, ...]  # pip requirements, installed in one command with TORCH
    script: str                # the quantize script run with the venv's python (in this folder)
    version_of: str            # distribution whose version is reported as the tool's version
    output_format: str         # what it writes, as quantmoe's evaluator reads it
    env: tuple[tuple[str, str], ...] = ()  # environment for the quantize run
    script_args: tuple[str, ...] = ()      # more arguments for the script
    venv_name: str | None = None           # another row's venv (same packages), default its own
    in_verdict: bool = True                # False: a row shown beside the peers, not one the target is set by

    def venv(self, venvs: Path) -> Path:
        return Path(venvs) / (self.venv_name or self.name)


PEERS: dict[str, PeerTool] = {
    tool.name: tool
    for tool in (
        PeerTool(
            name="gptqmodel",
            packages=("gptqmodel==7.6.0", "transformers==5.23.0"),
            script="quantize_gptqmodel.py",
            version_of="gptqmodel",
            output_format="GPTQ v1 (GPTQModel's tensor names)",
            # GPTQModel needs a worker count on a CPU-only machine; dynamo compiles on first call otherwise.
            env=(("GPTQMODEL_CPU_WORKERS", "2"), ("TORCHDYNAMO_DISABLE", "1")),
        ),
        PeerTool(
            # GPTQModel's Qwen2-MoE definition as it ships: on a model with dense (mlp_only_layers) layers
            # it has no entry for their MLP, which stays fp16 (more bits than the other rows).
            name="gptqmodel-dense-fp16",
            packages=("gptqmodel==7.6.0", "transformers==5.23.0"),
            script="quantize_gptqmodel.py",
            script_args=("--dense-mlp", "fp16"),
            venv_name="gptqmodel",
            in_verdict=False,
            version_of="gptqmodel",
            output_format="GPTQ v1 (GPTQModel's tensor names)",
            env=(("GPTQMODEL_CPU_WORKERS", "2"), ("TORCHDYNAMO_DISABLE", "1")),
        ),
        PeerTool(
            name="llmcompressor",
            packages=("llmcompressor==0.14.0.1", "transformers==5.17.0"),
            script="quantize_llmcompressor.py",
            version_of="llmcompressor",
            output_format="compressed-tensors pack-quantized",
            env=(("TORCHDYNAMO_DISABLE", "1"),),
        ),
    )
}


def venv_python(tool: PeerTool, venvs: Path) -> Path:
    return tool.venv(venvs) / "bin" / "python"


def ensure_venv(tool: PeerTool, venvs: Path, log) -> Path:
    """Create the tool's venv unless one with the same requirements is already there; returns its python."""
    venv = tool.venv(venvs)
    stamp = venv / "peer-requirements.json"
    wanted = [TORCH, *tool.packages]
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and venv_python(tool, venvs).is_file():
        return venv_python(tool, venvs)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating {venv} ({' '.join(wanted)})")
    subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + wanted, check=True)
    stamp.write_text(json.dumps(wanted))
    return venv_python(tool, venvs)


def installed_versions(python: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of distributions installed in another venv."""
    code = ("import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
            "for n in sys.argv[1:]:\n    try: out[n] = version(n)\n    except PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def script_arguments(argv: list[str] | None = None, more=None) -> tuple[argparse.Namespace, object]:
    """The command line every peer quantize script takes (MODEL CALIB OUT [--batch-size], and what
    ``more(parser)`` adds) and the calibration rows, int64 (N, L), read from CALIB. The scripts run
    in the peers' own venvs, where this module is importable from the script's folder."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    return args, load_file(args.calib)["input_ids"].long()
