"""HTTP routes over the run manager: start a run from a JSON config, list runs, one run's status, cancel;
the host's loaded model and its digest; installing the bundled micro-world model into the host.

Routes an extension adds to the host's app are not covered by the host's `--api-auth` (only its own
router is), so the same check is applied here (HTTP Basic) when credentials are given. Every path in a
request, and the run folder it defaults to, must lie inside the configured roots (`access.py`, shared
with the standalone page's endpoints): the API must not become a way to read or write anywhere.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime.)
"""

from pathlib import Path
from typing import Any, Callable, Sequence

from fastapi import Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..config import config_from_dict
from ..errors import UserFacingError
from ..run.manager import RunManager, RunnerBusy
from .access import Credentials, PathRoots

PREFIX = "/sdcustom/v1"


def _auth(credentials: Credentials) -> Callable[..., bool]:
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> bool:
        if credentials.allows(given.username, given.password):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


def _bad_request(error: UserFacingError, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail={"problem": error.problem, "fix": error.fix})


def register_routes(app: FastAPI, manager: RunManager, *, roots: Sequence[Path],
                    credentials: Credentials | None = None) -> None:
    dependencies = [Depends(_auth(credentials))] if credentials else []
    confinement = PathRoots(roots)

    def start(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        values = dict(payload)
        checkpoint = str(values.pop("checkpoint", "") or "")
        try:
            config = config_from_dict(values, source="the request")
            manager.host.prepare(config, checkpoint)
            confinement.confine_config(config)  # after prepare: its defaults (output folder, run folder) too
            status = manager.start(config)
        except UserFacingError as error:
            raise _bad_request(error, 409 if isinstance(error, RunnerBusy) else 400) from error
        return status.to_dict(with_losses=False)

    def list_runs() -> list[dict[str, Any]]:
        return [status.to_dict(with_losses=False) for status in manager.runs()]

    def one_run(run_id: str) -> dict[str, Any]:
        status = manager.status(run_id)
        if status is None:
            raise HTTPException(status_code=404, detail=f"No run {run_id!r}.")
        return status.to_dict()

    def install_micro_model(payload: dict[str, Any] = Body(default={})) -> dict[str, Any]:
        """The bundled micro-world model into the host's checkpoint folder (see microworld/install.py)."""
        from ..microworld.install import install_into_host

        try:
            installed = install_into_host(manager.host, overwrite=bool(payload.get("overwrite", False)))
        except UserFacingError as error:
            raise _bad_request(error, 409) from error
        return {"checkpoint": str(installed.checkpoint), "written": [str(path) for path in installed.written],
                "message": installed.message()}

    def host_model() -> dict[str, Any]:
        """The host's loaded model and its digest: equal before and after a run when training left it as it was."""
        return {"title": manager.host.model_label(), "digest": manager.host.loaded_model_digest()}

    def cancel(run_id: str) -> dict[str, Any]:
        if manager.status(run_id) is None:
            raise HTTPException(status_code=404, detail=f"No run {run_id!r}.")
        return {"cancelled": manager.cancel(run_id)}

    app.add_api_route(f"{PREFIX}/runs", start, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/runs", list_runs, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}", one_run, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/runs/{{run_id}}/cancel", cancel, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/micro-model", install_micro_model, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/host-model", host_model, methods=["GET"], dependencies=dependencies)
