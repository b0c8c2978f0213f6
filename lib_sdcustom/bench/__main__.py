"""`python -m lib_sdcustom.bench lora|dreambooth`: print benchmark figures."""

from __future__ import annotations

import argparse
import sys

from . import dreambooth, lora


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_sdcustom.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    lora_parser = commands.add_parser("lora", help="LoRA steps/s and peak memory, batch 1 and 4, latent cache on/off.")
    lora_parser.add_argument("--steps", type=int, default=30)
    one = commands.add_parser("lora-one", help=argparse.SUPPRESS)
    one.add_argument("settings")
    dreambooth_parser = commands.add_parser("dreambooth", help="DreamBooth steps/s and peak memory, prior preservation and "
                                                               "gradient checkpointing on/off.")
    dreambooth_parser.add_argument("--steps", type=int, default=20)
    commands.add_parser("dreambooth-one", help=argparse.SUPPRESS).add_argument("settings")
    args = parser.parse_args()
    if args.command == "lora-one":
        lora.child_main(args.settings)
    elif args.command == "dreambooth-one":
        dreambooth.child_main(args.settings)
    elif args.command == "dreambooth":
        sys.stdout.write(dreambooth.report(dreambooth.run(args.steps)) + "\n")
    else:
        sys.stdout.write(lora.report(lora.run(args.steps)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
