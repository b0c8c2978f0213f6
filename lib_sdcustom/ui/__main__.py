"""`python -m lib_sdcustom.ui --models-dir DIR`: the Customize tab without the WebUI (headless servers, tests).

DIR uses the WebUI's layout: checkpoints in DIR/Stable-diffusion, results in DIR/Lora, DIR/embeddings, ...
The page is the same tab the WebUI shows; `--api` adds the same HTTP routes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

EXTENSION_ROOT = Path(__file__).resolve().parents[2]
STYLE = EXTENSION_ROOT / "style.css"
SCRIPT = EXTENSION_ROOT / "javascript" / "sdcustom.js"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_sdcustom.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True, help="Folder with Stable-diffusion/, Lora/, embeddings/ ...")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1, this machine only).")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--api", action="store_true", help="Also serve the HTTP API under /sdcustom/v1.")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASSWORD[,USER:PASSWORD]",
                        help="Require this login for the page, its endpoints and the API (HTTP Basic for the API).")
    parser.add_argument("--data-root", type=Path, action="append", default=[],
                        help="A folder the page and API may read images from (repeatable; the models folder always may).")
    return parser


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def launch(args: argparse.Namespace) -> tuple[Any, str]:
    """Start the server without blocking; (gradio Blocks, local URL). One `Credentials` guards the page's
    endpoints (gradio's login) and the API; the host confines both to the same roots."""
    from ..host.access import parse_credentials
    from ..host.api import register_routes
    from ..host.base import StandaloneHost
    from ..run.manager import RunManager
    from . import build_tab, compat

    credentials = parse_credentials(args.api_auth)
    host = StandaloneHost(args.models_dir, data_roots=args.data_root)
    for folder in host.facts().output_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    manager = RunManager(host)
    facts = host.facts()
    css = _read(STYLE)
    facts.gradio_css = css
    demo = build_tab(facts, manager)
    script = _read(SCRIPT)
    if script:  # the WebUI injects our script itself; here the page runs it once it has loaded
        with demo:
            demo.load(None, None, None, **compat.js_kwargs(f"() => {{ {script}\n;window.sdcustomInit(); }}"))
    compat.enable_queue(demo, concurrency=4)
    app, local_url, _ = demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                                    auth=credentials.allows if credentials else None, **compat.launch_kwargs(css))
    if args.api:
        register_routes(app, manager, roots=facts.allowed_roots, credentials=credentials)
    return demo, local_url


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    demo, local_url = launch(args)
    print(f"SD Customize is ready at {local_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
