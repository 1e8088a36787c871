"""A small local HTTP server speaking the part of the Hugging Face Hub API that
huggingface_hub's create_repo, create_branch and upload_folder use (preupload, the git-LFS
batch API with basic transfer, LFS PUT, and the ndjson commit endpoint).

Tests point HF_ENDPOINT at it and run the real huggingface_hub client code. Xet uploads need
a CAS service this server does not emulate, so the tests set HF_HUB_DISABLE_XET=1: the client
then takes its LFS path (the one huggingface_hub uses wherever hf_xet is not installed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

WRITE_TOKEN, READ_TOKEN = "hf_test_write_token_abc123", "hf_test_read_token_def456"
MISSING_ORG = "no-such-org"  # creating a repo there answers 404


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos as {repo_id: {branch: {path: bytes}}}, LFS blobs by sha256, and a request log."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool] = {}
        self.blobs: dict[str, bytes] = {}
        self.lfs_uploads: list[str] = []  # oids PUT, in order
        self.commits: list[dict] = []
        self.heads: dict[tuple[str, str], str] = {}  # (repo, branch) -> commit oid
        self.requests: list[str] = []
        self.validated: list[str] = []  # README contents sent to /api/validate-yaml
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def branch(self, repo_id: str, revision: str) -> str:
        """A branch name, or the branch whose head commit is ``revision``."""
        if revision in self.repos.get(repo_id, {}):
            return revision
        heads = [b for (r, b), sha in self.heads.items() if r == repo_id and sha == revision]
        return heads[0] if heads else "main"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id][branch]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body=None, headers=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _token(self) -> str | None:
                auth = self.headers.get("Authorization", "")
                return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

            def _auth(self, write: bool) -> bool:
                token = self._token()
                if token not in (WRITE_TOKEN, READ_TOKEN):
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                if write and token != WRITE_TOKEN:
                    self._reply(403, {"error": "You don't have the rights to write to this repo"})
                    return False
                return True

            def do_HEAD(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"HEAD {path}")
                return self._resolve(path, body=False)

            def _resolve(self, path: str, body: bool):
                """File downloads (/{repo}/resolve/{revision}/{file}), with Range requests."""
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                files = (
                    hub.repos.get(match[1], {}).get(hub.branch(match[1], match[2]), {})
                    if match
                    else {}
                )
                if not match or match[3] not in files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                data, status = files[match[3]], 200
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if ranged:
                    end = int(ranged[2]) + 1 if ranged[2] else len(data)
                    data, status = data[int(ranged[1]) : end], 206
                self.send_response(status)
                self.send_header("ETag", f'"{git_sha1(files[match[3]])}"')
                self.send_header("X-Repo-Commit", hub.heads.get((match[1], match[2]), "0" * 40))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return None

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"GET {path}" + (" (range)" if "Range" in self.headers else ""))
                if "/resolve/" in path:
                    return self._resolve(path, body=True)
                if path == "/api/whoami-v2":
                    return self._whoami()
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                if tree and tree[1] in hub.repos and self._auth(write=False):
                    files = hub.repos[tree[1]][hub.branch(tree[1], tree[2])]
                    listing = [
                        {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
                        for name, data in sorted(files.items())
                    ]
                    return self._reply(200, listing)
                if tree:
                    return (
                        None if tree[1] in hub.repos else self._reply(404, {"error": "not found"})
                    )
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if not match or match[1] not in hub.repos:
                    return self._reply(
                        404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                    )
                if not self._auth(write=False):
                    return None
                repo_id, branch = match[1], match[2] or "main"
                siblings = [{"rfilename": name} for name in sorted(hub.repos[repo_id][branch])]
                sha = hub.heads.get((repo_id, branch), "0" * 40)
                return self._reply(200, {"id": repo_id, "sha": sha, "siblings": siblings})

            def do_PUT(self):
                path = urlparse(self.path).path
                hub.requests.append(f"PUT {path}")
                match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
                if not match:
                    return self._reply(404, {"error": "not found"})
                data = self._body()
                if hashlib.sha256(data).hexdigest() != match[1]:
                    return self._reply(400, {"error": "sha256 mismatch"})
                hub.blobs[match[1]] = data
                hub.lfs_uploads.append(match[1])
                return self._reply(200)

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"POST {path}")
                body = self._body()
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                match = re.fullmatch(r"/(.+/.+)\.git/info/lfs/objects/batch", path)
                if match:
                    return self._lfs_batch(match[1], json.loads(body))
                match = re.fullmatch(
                    r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path
                )
                if not match:
                    return self._reply(404, {"error": "not found"})
                repo_id, action, revision = match.groups()
                if repo_id not in hub.repos:
                    return self._reply(
                        404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                    )
                if not self._auth(write=True):
                    return None
                if action == "branch":
                    if revision in hub.repos[repo_id]:
                        return self._reply(409, {"error": "Reference already exists"})
                    hub.repos[repo_id][revision] = dict(hub.repos[repo_id]["main"])
                    return self._reply(200)
                if revision not in hub.repos[repo_id]:
                    return self._reply(
                        404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
                    )
                if action == "preupload":
                    return self._preupload(hub.repos[repo_id][revision], json.loads(body))
                return self._commit(repo_id, revision, body)

            def _whoami(self):
                if not self._auth(write=False):
                    return None
                role = "write" if self._token() == WRITE_TOKEN else "read"
                return self._reply(
                    200,
                    {
                        "type": "user",
                        "name": "user",
                        "orgs": [{"name": "my-org"}],
                        "auth": {"type": "access_token", "accessToken": {"role": role}},
                    },
                )

            def _create(self, payload: dict):
                if not self._auth(write=True):
                    return None
                repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                if payload.get("organization") == MISSING_ORG:
                    return self._reply(404, {"error": f"Organization {MISSING_ORG} not found"})
                url = {"url": f"{hub.url}/{repo_id}", "name": repo_id}
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", **url})
                hub.repos[repo_id] = {"main": {}}
                hub.private[repo_id] = (
                    bool(payload.get("private")) or payload.get("visibility") == "private"
                )
                return self._reply(200, url)

            def _validate_yaml(self, payload: dict):
                """The Hub checks a README's metadata before a commit that changes it."""
                hub.validated.append(payload["content"])
                match = re.match(r"---\n(.*?)\n---\n", payload["content"], re.S)
                try:
                    meta = yaml.safe_load(match[1]) if match else {}
                except yaml.YAMLError as exc:
                    return self._reply(400, {"errors": [{"message": str(exc)}]})
                if not isinstance(meta, dict):
                    return self._reply(400, {"errors": [{"message": "metadata is not a mapping"}]})
                return self._reply(200, {"errors": [], "warnings": []})

            def _preupload(self, files: dict[str, bytes], payload: dict):
                out = []
                for item in payload["files"]:
                    lfs = item["path"].endswith(".safetensors") or item["size"] > 10 * 2**20
                    old = files.get(item["path"])
                    oid = None
                    if old is not None:
                        oid = hashlib.sha256(old).hexdigest() if lfs else git_sha1(old)
                    out.append(
                        {
                            "path": item["path"],
                            "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
                return self._reply(200, {"files": out})

            def _lfs_batch(self, repo_id: str, payload: dict):
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if not self._auth(write=True):
                    return None
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.blobs:  # already stored: no action, no upload
                        href = f"{hub.url}/lfs-upload/{obj['oid']}"
                        entry["actions"] = {"upload": {"href": href}}
                    objects.append(entry)
                return self._reply(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id: str, revision: str, body: bytes):
                files = hub.repos[repo_id][revision]
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                for line in lines:
                    value = line["value"]
                    if line["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.blobs:
                            return self._reply(422, {"error": f"LFS object {value['oid']} missing"})
                        files[value["path"]] = hub.blobs[value["oid"]]
                    elif line["key"] == "deletedFile":
                        files.pop(value["path"], None)
                oid = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
                hub.commits.append({"repo": repo_id, "revision": revision, **header})
                hub.heads[(repo_id, revision)] = oid
                return self._reply(
                    200,
                    {
                        "success": True,
                        "commitOid": oid,
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                    },
                )

        return Handler
