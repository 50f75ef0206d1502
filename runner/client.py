"""Server mode of editkit-run: queue an API prompt on a running ComfyUI, follow it, fetch the outputs.

Standalone (stdlib; websocket-client when installed): POST /prompt, follow the run over /ws
(`executing`, `execution_cached`, `progress`, `executed`, `execution_success|error|interrupted`),
then read /history/<id> and download the output images through /view. Without websocket-client
it polls /history (no step progress).
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


class ServerError(RuntimeError):
    """The server refused the prompt (node_errors) or could not be reached."""

    def __init__(self, message: str, node_errors: dict | None = None, body=None):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.body = body


def _request(url: str, data=None, timeout: float = 60):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        raise ServerError(f"cannot reach the ComfyUI server at {url}: {getattr(e, 'reason', e)}") from None


def get_json(base: str, path: str, timeout: float = 60):
    status, body = _request(base.rstrip("/") + path, timeout=timeout)
    if status != 200:
        raise ServerError(f"GET {path} -> HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def object_info(base: str) -> dict:
    return get_json(base, "/object_info", timeout=120)


def queue(base: str, prompt: dict, client_id: str) -> dict:
    status, body = _request(base.rstrip("/") + "/prompt", {"prompt": prompt, "client_id": client_id})
    try:
        data = json.loads(body)
    except ValueError:
        data = {"error": {"message": body[:500].decode("utf-8", "replace")}}
    if status != 200:
        err = data.get("error") if isinstance(data.get("error"), dict) else {"message": str(data.get("error"))}
        raise ServerError(err.get("message", f"HTTP {status}") + (f": {err['details']}" if err.get("details") else ""),
                          data.get("node_errors") or {}, data)
    return data


def upload_image(base: str, path: str, name: str | None = None) -> str:
    """POST /upload/image (what the front end's upload button does): the file lands in the server's input
    folder under `name`; returns the name the server stored it as."""
    name = name or os.path.basename(path)
    boundary = uuid.uuid4().hex
    with open(path, "rb") as f:
        data = f.read()
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        f"Content-Type: image/png\r\n\r\n".encode(), data,
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput"
        f"\r\n--{boundary}--\r\n".encode()])
    req = urllib.request.Request(base.rstrip("/") + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read()).get("name", name)
    except urllib.error.HTTPError as e:
        raise ServerError(f"upload of {name} -> HTTP {e.code}: {e.read()[:300]!r}") from None
    except OSError as e:
        raise ServerError(f"cannot reach the ComfyUI server at {base}: {getattr(e, 'reason', e)}") from None


def _ws_connect(base: str, client_id: str):
    try:
        import websocket  # websocket-client
    except ImportError:
        return None
    u = urllib.parse.urlparse(base)
    scheme = "wss" if u.scheme == "https" else "ws"
    ws = websocket.create_connection(f"{scheme}://{u.netloc}{u.path.rstrip('/')}/ws?clientId={client_id}", timeout=30)
    return ws


def download(base: str, item: dict, out_dir: str) -> str:
    q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
    status, body = _request(base.rstrip("/") + "/view?" + q, timeout=120)
    if status != 200:
        raise ServerError(f"GET /view {item['filename']} -> HTTP {status}")
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, os.path.basename(item["filename"]))
    with open(dest, "wb") as f:
        f.write(body)
    return dest


def run(base: str, prompt: dict, out_dir: str, on_event=None, timeout: float = 3600) -> dict:
    """Queue and follow one prompt. Returns {success, prompt_id, outputs, node_times, total_time,
    node_errors, error}; raises ServerError when the server refuses the prompt."""
    client_id = uuid.uuid4().hex
    ws = _ws_connect(base, client_id)  # connect first so no message is missed
    t0 = time.perf_counter()
    try:
        resp = queue(base, prompt, client_id)
        pid = resp["prompt_id"]
        node_times, started, current = {}, {}, None
        error, finished = None, False
        deadline = time.monotonic() + timeout

        def switch(node):
            nonlocal current
            now = time.perf_counter()
            if current is not None:
                node_times[current] = node_times.get(current, 0.0) + now - started[current]
            current = node
            if node is not None:
                started[node] = now

        while not finished and time.monotonic() < deadline:
            if ws is None:
                hist = get_json(base, f"/history/{pid}")
                if pid in hist:
                    break
                time.sleep(0.5)
                continue
            try:
                msg = ws.recv()
            except Exception as e:  # timeout: check whether the prompt finished meanwhile
                if type(e).__name__ == "WebSocketTimeoutException":
                    if pid in get_json(base, f"/history/{pid}"):
                        break
                    continue
                raise ServerError(f"websocket closed: {e}") from None
            if not isinstance(msg, str):
                continue  # binary frames are previews
            m = json.loads(msg)
            typ, data = m.get("type"), m.get("data") or {}
            if data.get("prompt_id") not in (None, pid):
                continue
            if typ == "executing":
                switch(data.get("node"))
                if data.get("node") is None and data.get("prompt_id") == pid:
                    finished = True
            elif typ in ("execution_success",):
                switch(None)
                finished = True
            elif typ in ("execution_error", "execution_interrupted"):
                switch(None)
                error = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback")}
                if typ == "execution_interrupted":
                    error["exception_message"] = "interrupted"
                finished = True
            if on_event and typ in ("executing", "execution_cached", "progress", "executed"):
                on_event(typ, data)
        else:
            if not finished:
                switch(None)
        # /history is written right after the last message; poll briefly.
        hist = {}
        for _ in range(100):
            hist = get_json(base, f"/history/{pid}")
            if pid in hist:
                break
            time.sleep(0.2)
        entry = hist.get(pid)
        if entry is None:
            return {"success": False, "prompt_id": pid, "outputs": [], "node_times": node_times,
                    "total_time": time.perf_counter() - t0, "node_errors": resp.get("node_errors") or {},
                    "error": error or {"exception_message": f"no result after {timeout:.0f} s"}}
        status = entry.get("status") or {}
        if error is None and status.get("status_str") == "error":
            for name, data in status.get("messages") or []:
                if name == "execution_error":
                    error = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback")}
        files = []
        for node_out in (entry.get("outputs") or {}).values():
            for item in node_out.get("images", []) if isinstance(node_out, dict) else []:
                if item.get("type") == "output":
                    files.append(download(base, item, out_dir))
        node_errors = resp.get("node_errors") or {}
        return {"success": error is None and status.get("status_str", "success") == "success" and not node_errors,
                "prompt_id": pid, "outputs": files, "node_times": node_times, "total_time": time.perf_counter() - t0,
                "node_errors": node_errors, "error": error}
    finally:
        if ws is not None:
            ws.close()
