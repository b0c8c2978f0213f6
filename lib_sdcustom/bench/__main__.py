"""`python -m lib_sdcustom.bench lora|dreambooth|speed|quality`: print benchmark figures (numbers and ratios, no
pass/fail).

`speed` puts LoRA/LoCon training through `train()` beside a plain diffusers + peft loop (see `bench/speed.py`);
`gpu-check` runs its full-size GPU plans in one go (`bench/gpu_check.py`); `sizes` prints each network method's
file size at full-size shapes (`bench/network_sizes.py`); `resident` counts what a LoRA run keeps on the GPU
during its steps, ours beside the reference (`bench/resident.py`).

`quality` trains every method on the bundled micro-world model and writes its table and figures (see
`bench/quality.py`); `best-step` checks best-step selection against the micro-world judge (`bench/best_step.py`)."""

from __future__ import annotations

import argparse
import sys

from . import best_step, dreambooth, gpu_check, lora, network_sizes, quality, resident, speed
from ..models.bundle import ModelFamily

SCENARIOS = {
    "lora": (lora, "LoRA steps/s and peak memory, batch 1 and 4, latent cache on/off, per model family.", 30),
    "dreambooth": (dreambooth, "DreamBooth steps/s and peak memory, prior preservation and gradient checkpointing "
                               "on/off, per model family.", 20),
}
FAMILIES = tuple(family.value for family in ModelFamily)


def _families(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model family: {', '.join(unknown) or repr(text)}; use a "
                                         f"comma-separated list of {', '.join(FAMILIES)}")
    return list(dict.fromkeys(names))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_sdcustom.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text, default_steps) in SCENARIOS.items():
        scenario = commands.add_parser(name, help=help_text)
        scenario.add_argument("--steps", type=int, default=default_steps)
        scenario.add_argument("--families", type=_families, default=["sd1", "sdxl"],
                              help="Tiny models to measure, comma-separated (default: sd1,sdxl; also sd2).")
        commands.add_parser(module.CHILD_COMMAND, help=argparse.SUPPRESS).add_argument("settings")
    quality.add_arguments(commands.add_parser("quality", help="Customization quality of every method on the micro-world "
                                                                "model: JSON, Markdown table and PNG grids."))
    best_step.add_arguments(commands.add_parser("best-step", help="Best-step selection's self-check against the "
                                                                  "micro-world judge, per run and step."))
    speed.add_arguments(commands.add_parser("speed", help="LoRA/LoCon steps/s, memory and first-step time of train() "
                                                          "beside a plain diffusers + peft loop, with the ratio."))
    commands.add_parser(speed.CHILD_COMMAND, help=argparse.SUPPRESS).add_argument("settings")
    network_sizes.add_arguments(commands.add_parser("sizes", help="File size of every network method at full SD1.5 "
                                                                  "and SDXL shapes (meta device, seconds)."))
    resident.add_arguments(commands.add_parser("resident", help="What a full-size LoRA run keeps on the GPU during its "
                                                                "steps, ours beside the reference (meta device, seconds)."))
    gpu_check.add_arguments(commands.add_parser("gpu-check", help="Full-size SD1.5 and SDXL LoRA on one GPU, ours "
                                                                 "beside the reference, 30 steps each (--dry-run: tiny, CPU)."))
    args = parser.parse_args()
    if args.command == "quality":
        return quality.main(args)
    if args.command == "best-step":
        return best_step.main(args)
    if args.command == "speed":
        return speed.main(args)
    if args.command == "sizes":
        return network_sizes.main(args)
    if args.command == "resident":
        return resident.main(args)
    if args.command == "gpu-check":
        return gpu_check.main(args)
    if args.command == speed.CHILD_COMMAND:
        speed.child(args.settings)
        return 0
    children = {module.CHILD_COMMAND: module for module, _, _ in SCENARIOS.values()}
    if args.command in children:
        children[args.command].child(args.settings)
    else:
        module = SCENARIOS[args.command][0]
        sys.stdout.write(module.report(module.run(args.steps, args.families)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
