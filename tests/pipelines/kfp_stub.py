"""A recording stand-in for the Kubeflow Pipelines v2beta1 REST API (no KFP API
server can run here): answers what `kfp.Client` calls for upload / run / recurring
run with minimal valid bodies, keeps pipelines and experiments it was given, and
records every request (method, path, query, body) for the tests to check. With `refuse`
set it answers every request with that HTTP status (an API behind a login, say)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def _filtered_name(query: dict) -> str:
    predicate = json.loads(query["filter"])["predicates"][0]
    return predicate.get("string_value") or predicate["stringValue"]


class KfpStub:
    def __init__(self, refuse: int | None = None):
        self.requests: list[dict] = []
        self.pipelines: dict[str, str] = {}  # name -> id
        self.versions: dict[str, list[str]] = {}  # pipeline id -> version ids
        self.experiments: dict[str, str] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> tuple[str, dict, bytes]:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                stub.requests.append({"method": self.command, "path": url.path, "query": query, "body": body})
                return url.path, query, body

            def do_GET(self):
                path, query, _ = self._record()
                if refuse:
                    return self._reply({"error": "refused"}, refuse)
                if path == "/apis/v2beta1/healthz":
                    return self._reply({"multi_user": False})
                if path == "/apis/v2beta1/pipelines":
                    name = _filtered_name(query)
                    found = (
                        [{"pipeline_id": stub.pipelines[name], "display_name": name}] if name in stub.pipelines else []
                    )
                    return self._reply({"pipelines": found} if found else {})
                if path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions"):
                    pid = path.split("/")[4]
                    return self._reply({"pipeline_versions": [{"pipeline_id": pid, "pipeline_version_id": v}
                                                              for v in reversed(stub.versions[pid])]})  # fmt: skip
                if path == "/apis/v2beta1/experiments":
                    name = _filtered_name(query)
                    found = (
                        [{"experiment_id": stub.experiments[name], "display_name": name}]
                        if name in stub.experiments
                        else []
                    )
                    return self._reply({"experiments": found, "total_size": len(found)} if found else {})
                return self._reply({"error": f"unknown {path}"}, 404)

            def do_POST(self):
                path, query, body = self._record()
                if refuse:
                    return self._reply({"error": "refused"}, refuse)
                if path == "/apis/v2beta1/pipelines/upload":
                    pid = f"pipeline-{len(stub.pipelines) + 1}"
                    stub.pipelines[query["name"]] = pid
                    stub.versions[pid] = [f"{pid}-v1"]
                    return self._reply({"pipeline_id": pid, "display_name": query["name"]})
                if path == "/apis/v2beta1/pipelines/upload_version":
                    pid = query["pipelineid"]
                    stub.versions[pid].append(f"{pid}-v{len(stub.versions[pid]) + 1}")
                    return self._reply({"pipeline_id": pid, "pipeline_version_id": stub.versions[pid][-1]})
                if path == "/apis/v2beta1/experiments":
                    name = json.loads(body)["display_name"]
                    stub.experiments[name] = f"experiment-{len(stub.experiments) + 1}"
                    return self._reply({"experiment_id": stub.experiments[name], "display_name": name})
                if path == "/apis/v2beta1/runs":
                    return self._reply({"run_id": f"run-{len(stub.requests)}"})
                if path == "/apis/v2beta1/recurringruns":
                    return self._reply({"recurring_run_id": f"recurring-{len(stub.requests)}"})
                return self._reply({"error": f"unknown {path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posted(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
