"""A loopback fake of the Hugging Face Hub API, enough for `HfApi.create_repo` and a regular
(non-LFS) `HfApi.create_commit` or `upload_folder`. Tests point `HF_ENDPOINT` at it (or pass
it as the endpoint); nothing leaves 127.0.0.1.

Routes (the ones huggingface_hub 2.4 calls for that path, see docs/hub_and_wandb.md):
POST /api/repos/create, POST /api/validate-yaml, POST /api/models/{repo}/preupload/{rev}
(answers uploadMode "regular"), POST /api/models/{repo}/commit/{rev} (NDJSON, base64 file
contents), and HEAD/GET of anything else: 404 EntryNotFound.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint. `hub.commits` is a
    list of {"repo", "revision", "summary", "files": {path: bytes}, "token"} dicts."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body=None, headers=None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                return data

            def _token(self):
                auth = self.headers.get("Authorization", "")
                return auth[7:] if auth.startswith("Bearer ") else None

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                self._send(404, None, {"X-Error-Code": "EntryNotFound",
                                       "X-Error-Message": "Entry not found"})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self._body()
                token = self._token()
                if token is None:
                    return self._send(401, {"error": "Invalid credentials"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    hub.repos.setdefault(repo, {"private": req.get("private")})
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo,
                                            "id": hashlib.sha1(repo.encode()).hexdigest()})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
                if m:
                    files = json.loads(body).get("files", [])
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                m = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
                if m:
                    commit = {"repo": m.group(1), "revision": m.group(2), "files": {},
                              "token": token, "summary": None}
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"].get("summary")
                        elif item["key"] == "file":
                            v = item["value"]
                            commit["files"][v["path"]] = base64.b64decode(v["content"])
                        else:  # lfsFile, deletedFile...: not supported by this fake
                            return self._send(400, {"error": f"unsupported {item['key']}"})
                    hub.commits.append(commit)
                    oid = hashlib.sha1(str(len(hub.commits)).encode()).hexdigest()
                    return self._send(200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                return self._send(404, {"error": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.02})  # a quick shutdown

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
