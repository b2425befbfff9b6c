"""`fuselm serve`: setups served as OpenAI-compatible models over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from ..config import validation_message
from ..errors import FuselmError
from ..files import load_yaml
from .flags import add_run_flags, run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="serve setups as OpenAI-compatible models over HTTP (see docs/serving.md)")
    add_run_flags(v, config_help="serve config: setups, limits, host, port (see docs/serving.md)")
    v.add_argument("--id", help="model id of the setup given by --models/--method (default: the method, or the model)")
    v.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="copies of the --models setup's models, requests run side by side on them (default 1)")  # fmt: skip
    v.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default 8000)")
    v.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="require `Authorization: Bearer KEY` (or FUSELM_API_KEY)"
    )
    _add_limit_flags(v)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """One flag per server limit (`request_timeout_s` is `--request-timeout SECONDS`)."""
    from ..serve.config import Limits

    g = p.add_argument_group("limits")
    for name, f in Limits.model_fields.items():
        seconds = name.endswith("_s")
        flag = "--" + (name[:-2] if seconds else name).replace("_", "-")
        kind = f.annotation if f.annotation in (int, float) else str
        g.add_argument(flag, dest=f"limit_{name}", type=kind, default=argparse.SUPPRESS, metavar="S" if seconds else "N",
                       help=f"{f.description} (default {f.default})")  # fmt: skip


def run(ns: argparse.Namespace) -> int:
    from ..serve.config import ServeConfig

    data = load_yaml(ns.config) if ns.config else {}
    if ns.models or ns.calibration:  # one setup from the flags
        setup = run_config(ns, data={})
        default_id = setup.models[0].name if setup.method == "single" and len(setup.models) == 1 else setup.method
        if ns.calibration and not ns.id:
            default_id = Path(ns.calibration).stem
        entry = {"id": ns.id or Path(default_id).name, "replicas": ns.replicas, **setup.model_dump(mode="json")}
        # each entry as given: its defaults written out would read as set (an engine entry refuses local fields)
        entry["models"] = [m.model_dump(mode="json", exclude_unset=True) for m in setup.models]
        data["setups"] = [*(data.get("setups") or []), entry]
    elif not data.get("setups"):
        raise FuselmError("nothing to serve: give --models NAMES (and --method) or a --config with setups")
    for key in ("host", "port", "api_key"):
        if hasattr(ns, key):
            data[key] = getattr(ns, key)
    if "api_key" not in data and "FUSELM_API_KEY" in os.environ:
        if not os.environ["FUSELM_API_KEY"].strip():
            raise FuselmError("FUSELM_API_KEY is set but empty: give a key, or unset it to serve without one")
        data["api_key"] = os.environ["FUSELM_API_KEY"]
    limits = {k[len("limit_") :]: v for k, v in vars(ns).items() if k.startswith("limit_")}
    if limits:
        data["limits"] = {**(data.get("limits") or {}), **limits}
    try:
        cfg = ServeConfig(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, ns.config or "options", ServeConfig)) from None
    from ..fusion.methods import check_method

    for s in cfg.setups:  # before the server starts: a bad method or option is a one-line error here
        check_method(s.method, len(s.models), s.method_options)
    import uvicorn

    from ..serve.app import build_app

    app = build_app(cfg)
    if not cfg.loopback() and not cfg.api_key:
        print(f"fuselm: warning: serving on {cfg.host}, reachable from other machines, without an API key: anyone"
              " who reaches it can generate (set --api-key or FUSELM_API_KEY)", file=sys.stderr, flush=True)  # fmt: skip
    where = f"http://{cfg.host}:{cfg.port}"
    print(f"fuselm: serving {', '.join(s.id for s in cfg.setups)} on {where} (loading models: {where}/ready "
          "says when they answer)", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if ns.debug else "warning",
                timeout_graceful_shutdown=10)  # fmt: skip
    return 0
