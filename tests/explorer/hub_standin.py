"""A stand-in for the few Hugging Face Hub endpoints a Space upload uses, on 127.0.0.1, for the real client.

It answers `huggingface_hub`'s create-repo, tree listing, pre-upload, LFS batch + PUT, commit, Space
variable and hardware calls (the HTTP LFS path: run the client with HF_HUB_DISABLE_XET=1), keeps
what was committed, and records every request, so a test can check exactly what an upload sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


class HubState:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        """repo id -> the create-repo payload."""
        self.files: dict[str, bytes] = {}
        """Committed path -> content (LFS files resolved to their uploaded bytes)."""
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict[str, Any]] = []
        self.variables: dict[str, str] = {}
        self.hardware: str | None = None
        self.validated: list[Any] = []
        """Front matters sent to /api/validate-yaml."""
        self.auth: set[str] = set()
        """Authorization headers seen."""


def _handler(state: HubState, base_url: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, obj: Any, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _seen(self) -> str:
            path = self.path.split("?")[0]
            state.requests.append((self.command, path))
            if self.headers.get("Authorization"):
                state.auth.add(self.headers["Authorization"])
            return path

        def do_GET(self) -> None:
            path = self._seen()
            if "/tree/" in path:
                return self._json([{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                   for p, b in state.files.items()])
            self._json({"error": f"not served: {path}"}, 404)

        def do_PUT(self) -> None:
            path = self._seen()
            data = self._body()
            if path.startswith("/lfs-upload/"):
                state.lfs[path.rsplit("/", 1)[1]] = data
                return self._json({})
            self._json({"error": f"not served: {path}"}, 404)

        def do_POST(self) -> None:
            path = self._seen()
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else \
                    payload["name"]
                state.repos[repo] = payload
                return self._json({"url": f"{base_url}/spaces/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._validate(json.loads(body))
            if path.endswith("/preupload/main"):
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "lfs" if f["size"] > 1000 else
                                              "regular", "shouldIgnore": False} for f in files]})
            if path.endswith("/info/lfs/objects/batch"):
                objects = json.loads(body)["objects"]
                return self._json({"objects": [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                                                "actions": {"upload": {"href": f"{base_url}/lfs-upload/{o['oid']}"}}}
                                               for o in objects]})
            if path.endswith("/commit/main"):
                return self._commit(path.split("/")[2:5], body)
            if path.endswith("/variables"):
                payload = json.loads(body)
                state.variables[payload["key"]] = payload["value"]
                return self._json({})
            if path.endswith("/hardware"):
                state.hardware = json.loads(body)["flavor"]
                return self._json({"stage": "BUILDING", "hardware": {"current": None, "requested": state.hardware}})
            self._json({"error": f"not served: {path}"}, 404)

        def _validate(self, payload: dict[str, Any]) -> None:
            """The README's front matter must be a YAML mapping; a Space's must name its sdk."""
            text = payload["content"]
            block = text.split("---")[1] if text.startswith("---") else ""
            meta = yaml.safe_load(block) if block else None
            errors = [] if isinstance(meta, dict) else [{"message": "no YAML front matter"}]
            if payload.get("repoType") == "space" and isinstance(meta, dict) and not meta.get("sdk"):
                errors.append({"message": "a Space needs `sdk`"})
            state.validated.append(meta)
            self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

        def _commit(self, where: list[str], body: bytes) -> None:
            """`where`: [repo type (plural), namespace, name], from /api/spaces/NS/NAME/commit/main."""
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            for item in lines:
                kind, value = item["key"], item["value"]
                if kind == "file":
                    state.files[value["path"]] = base64.b64decode(value["content"])
                elif kind == "lfsFile":
                    data = state.lfs[value["oid"]]
                    assert hashlib.sha256(data).hexdigest() == value["oid"]
                    state.files[value["path"]] = data
                elif kind in ("deletedFile", "deletedFolder"):
                    state.files.pop(value["path"], None)
            state.commits.append(lines[0]["value"])
            oid = f"{len(state.commits):040x}"
            self._json({"commitUrl": f"{base_url}/{'/'.join(where)}/commit/{oid}", "commitOid": oid})

    return Handler


class HubStandIn:
    """`with HubStandIn() as hub:` serves on hub.url until the block ends; hub.state holds what arrived."""

    def __init__(self) -> None:
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.server.RequestHandlerClass = _handler(self.state, self.url)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
