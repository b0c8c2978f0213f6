"""The standalone server's one access layer (`host/access.py`): every route of the page (gradio) and of the API
refuses a request without the configured login, and every path a request names must lie inside the
configured roots, whether given absolute, with `..` or through a symbolic link; the run folder a run
would default to as well (an output folder that is a root itself puts it outside)."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import write_images
from lib_sdcustom.host.access import PathRoots, parse_credentials
from lib_sdcustom.host.base import StandaloneHost
from lib_sdcustom.run.manager import RunManager

gradio = pytest.importorskip("gradio")
fastapi = pytest.importorskip("fastapi")

API_ROUTES = [("GET", "/sdcustom/v1/runs"), ("POST", "/sdcustom/v1/runs"), ("GET", "/sdcustom/v1/runs/abc"),
              ("POST", "/sdcustom/v1/runs/abc/cancel")]
#: The page's data routes in gradio 3 and in gradio 4+ (under /gradio_api); those the app has are tried.
GRADIO_ROUTES = [("GET", "/config"), ("GET", "/info"), ("POST", "/run/predict"), ("POST", "/api/predict"),
                 ("POST", "/upload"), ("GET", "/queue/status"), ("GET", "/file={file}"),
                 ("GET", "/gradio_api/info"), ("POST", "/gradio_api/run/predict"), ("POST", "/gradio_api/api/predict"),
                 ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/file={file}")]


def _models(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    for item in tiny_checkpoint.parent.glob("tiny*"):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, models / "Stable-diffusion" / item.name)
    return models


def _request(url: str, method: str, auth: tuple[str, str] | None = None) -> int:
    import base64

    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method)
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _has_route(app, method: str, path: str) -> bool:
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    return any(route.matches(scope)[0] is Match.FULL for route in app.routes)


@pytest.fixture
def server(tmp_path, tiny_checkpoint):
    from http_helpers import free_port

    from lib_sdcustom.ui.__main__ import build_parser, launch

    models = _models(tmp_path, tiny_checkpoint)
    images = write_images(tmp_path / "images")
    args = build_parser().parse_args(["--models-dir", str(models), "--api", "--api-auth", "u:secret",
                                      "--port", str(free_port()), "--data-root", str(images)])
    demo, url = launch(args)
    try:
        yield demo, url.rstrip("/"), images
    finally:
        demo.close()


def test_every_route_of_the_page_and_the_api_needs_the_login(server):
    demo, base, images = server
    app = demo.server_app if hasattr(demo, "server_app") else demo.app
    tried = []
    for method, path in API_ROUTES + GRADIO_ROUTES:
        path = path.format(file=urllib.parse.quote(str(images / "img0.png")))
        if not _has_route(app, method, path.split("?")[0]):
            continue
        tried.append(path)
        assert _request(base + path, method) in (401, 403), f"{method} {path} answered without credentials"
        assert _request(base + path, method, auth=("u", "wrong")) in (401, 403), f"{method} {path}: wrong password"
    assert len(tried) >= len(API_ROUTES) + 4, tried
    assert _request(base + "/sdcustom/v1/runs", "GET", auth=("u", "secret")) == 200


def test_the_page_login_takes_the_same_credentials(server):
    import http.cookiejar

    demo, base, _ = server
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": "u", "password": "wrong"}).encode()
    with pytest.raises(urllib.error.HTTPError):
        opener.open(base + "/login", data=form)
    opener.open(base + "/login", data=urllib.parse.urlencode({"username": "u", "password": "secret"}).encode())
    with opener.open(base + "/config") as response:
        assert response.status == 200


def test_credentials_compare_user_and_password():
    credentials = parse_credentials("u:p, admin:a:b")
    assert credentials.allows("u", "p") and credentials.allows("admin", "a:b")
    assert not credentials.allows("u", "P") and not credentials.allows("nobody", "") and not credentials.allows("", "")
    assert parse_credentials("") is None


# ----- paths outside the roots -----

def _outside_path(kind: str, root: Path, outside: Path) -> str:
    if kind == "absolute":
        return str(outside)
    if kind == "dotdot":
        return str(root / ".." / outside.name)
    link = root / "link"
    link.symlink_to(outside, target_is_directory=True)
    return str(link)


@pytest.fixture
def confined(tmp_path, tiny_checkpoint):
    from lib_sdcustom.ui import TabController

    models = _models(tmp_path, tiny_checkpoint)
    images = write_images(tmp_path / "root" / "images")
    outside = write_images(tmp_path / "secret")
    host = StandaloneHost(models, data_roots=[images.parent])
    return TabController(host.facts(), RunManager(host)), models, images, outside


def _form(controller, folder: str, **overrides):
    from test_extension_standalone import values

    return values(controller, folder, "x", **overrides)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_the_page_refuses_image_folders_outside_the_roots(confined, kind):
    controller, models, images, outside = confined
    folder = _outside_path(kind, images.parent, outside)
    panel, thumbnails, _, seen = controller.check_folder(*_form(controller, folder))
    assert "outside the folders this server may use" in panel and thumbnails == [] and seen == 0
    before = sorted(models.rglob("*"))
    html = controller.train("", *_form(controller, folder))[-1]
    assert "outside the folders this server may use" in html and "Fix:" in html
    assert sorted(models.rglob("*")) == before


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
@pytest.mark.parametrize("setting", [("data", "data"), ("output", "out"), ("output", "run_dir"), ("model", "base")])
def test_the_api_refuses_paths_outside_the_roots(confined, kind, setting):
    from http_helpers import http, serve

    from lib_sdcustom.host.api import register_routes

    controller, models, images, outside = confined
    app = fastapi.FastAPI()
    register_routes(app, controller.manager, roots=controller.facts.allowed_roots,
                    credentials=parse_credentials("u:p"))
    section, name = setting
    run = {"method": "lora", "checkpoint": "tiny.safetensors", "data": {"data": str(images)}, "output": {"name": "x"}}
    run.setdefault(section, {})[name] = _outside_path(kind, images.parent, outside)
    if setting == ("model", "base"):
        run.pop("checkpoint")
    with serve(app) as base:
        code, body = http(f"{base}/sdcustom/v1/runs", run, auth=("u", "p"))
    assert code == 400 and "outside the folders this server may use" in body["detail"]["problem"], body
    assert not list(outside.parent.glob("sdcustom-runs")) and not (models / "Lora").exists()


def test_an_output_folder_that_is_a_root_keeps_the_run_folder_inside(confined):
    controller, models, images, _ = confined
    config = controller.config(*_form(controller, str(images)))
    config.output.out = str(models)  # the run folder would default to models/../sdcustom-runs/x
    with pytest.raises(Exception) as raised:
        controller.host.prepare(config, "tiny.safetensors")
    assert "run folder" in str(raised.value) and "outside" in str(raised.value)
    config.output.run_dir = str(models / "runs" / "x")
    controller.host.prepare(config, "tiny.safetensors")
    assert PathRoots(controller.facts.allowed_roots).contains(config.run_path)
