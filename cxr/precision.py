"""The training precision, chosen by the hardware: bfloat16 autocast where the chip computes it natively, float32
everywhere else. Emulated bfloat16 (a CPU without AVX-512 BF16 or AMX) runs many times slower than float32, so an
explicit `--bf16` there stops before any work unless `--precision bf16` insists."""

from __future__ import annotations

import argparse
import platform

import torch
from transformers.hf_argparser import string_to_bool

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> tuple[bool, str]:
    """Whether this machine computes bfloat16 natively, and what was found, in words."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"GPU {name} computes bfloat16 natively"
        return False, f"GPU {name} has no native bfloat16"
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        found = [
            name
            for name, has in (
                ("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported()),
                ("AMX", torch.cpu._is_amx_tile_supported()),
            )
            if has
        ]
        native, instructions = bool(found), " and ".join(found) or "AVX-512 BF16 or AMX"
    else:  # Arm and the rest: oneDNN says whether the CPU has bfloat16 instructions
        native, instructions = torch.ops.mkldnn._is_mkldnn_bf16_supported(), "bfloat16 instructions"
    if native:
        return True, f"CPU ({capability}) has {instructions}"
    return False, f"CPU ({capability}) has no {instructions}: bfloat16 would be emulated, many times slower"


def resolve_precision(argv: list[str]) -> tuple[list[str], dict]:
    """`argv` with the precision made explicit for `TrainingArguments` (`--bf16`, plus `--use_cpu` without a GPU, which
    bfloat16 on a CPU needs), and the choice with its reason, for the log and run.json.

    `--precision auto` (the default) picks bfloat16 autocast where it is native, else float32; `--precision bf16` or
    `fp32` insists. A plain `--bf16` counts as a wish for native bfloat16: without it, training stops here."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--precision", default="auto", choices=PRECISIONS)
    for flag in ("--bf16", "--fp16", "--use_cpu"):
        probe.add_argument(flag, type=string_to_bool, nargs="?", const=True, default=False)
    given, _ = probe.parse_known_args(argv)
    native, found = native_bf16()
    if given.fp16:
        return argv, {"precision": "fp16", "reason": "--fp16 given", "hardware": found}
    if given.precision == "fp32" and given.bf16:
        raise SystemExit("--precision fp32 and --bf16 contradict each other: give one.")
    if given.bf16 and given.precision == "auto" and not native:
        raise SystemExit(
            f"--bf16 asks for bfloat16, but this {found}. "
            "Leave --bf16 out to let training choose (float32 here), or give --precision bf16 to insist."
        )
    if given.precision == "bf16" or given.bf16:
        precision, reason = "bf16", f"{'--precision bf16' if given.precision == 'bf16' else '--bf16'} given; {found}"
    elif given.precision == "fp32":
        precision, reason = "fp32", f"--precision fp32 given; {found}"
    else:
        precision, reason = ("bf16" if native else "fp32"), f"chosen by the hardware: {found}"
    extra = []
    if precision == "bf16":
        extra += [] if given.bf16 else ["--bf16"]
        extra += [] if given.use_cpu or torch.cuda.is_available() else ["--use_cpu"]
    return argv + extra, {"precision": precision, "reason": reason, "hardware": found}


def describe(choice: dict) -> str:
    names = {"bf16": "bfloat16 autocast", "fp32": "float32", "fp16": "float16 autocast"}
    return f"{names[choice['precision']]} ({choice['reason']})"
