"""httpGet probes as the kubelet runs them: to the port the container declares (by number or by
name), startup first, then readiness; liveness watched in the background until the pod ends."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any


class ProbeError(AssertionError):
    pass


def probe_url(spec: dict[str, Any], probe: dict[str, Any]) -> str:
    if "httpGet" not in probe:
        raise ProbeError(f"container {spec['name']}: only httpGet probes are simulated, not {sorted(probe)}")
    get = probe["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        named = {p.get("name"): p["containerPort"] for p in spec.get("ports", [])}
        if port not in named:
            raise ProbeError(f"container {spec['name']}: probe port {port!r} is not a declared container port")
        port = named[port]
    return f"http://127.0.0.1:{port}{get.get('path', '/')}"


def succeeds(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


class Prober:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.liveness_failures: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def wait_started_and_ready(self, c: Any, timeout: float) -> None:
        for kind in ("startupProbe", "readinessProbe"):
            probe = c.spec.get(kind)
            if probe is None:
                continue
            url = probe_url(c.spec, probe)
            deadline = time.monotonic() + timeout
            while not succeeds(url, probe.get("timeoutSeconds", 1)):
                if c.proc.poll() is not None:
                    code = c.proc.returncode
                    raise ProbeError(f"{c.name} exited {code} before its {kind} passed:\n{c.logs()[-3000:]}")
                if time.monotonic() > deadline:
                    raise ProbeError(f"{c.name}: {kind} {url} did not pass within {timeout} s:\n{c.logs()[-3000:]}")
                time.sleep(0.1)  # polling interval; the deadline above bounds the wait
            self.events.append(f"{c.name} {kind} passed")

    def watch_liveness(self, c: Any) -> None:
        probe = c.spec.get("livenessProbe")
        if probe is None:
            return
        url = probe_url(c.spec, probe)
        allowed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

        def watch() -> None:
            failing_since = None
            while not self._stop.wait(0.5) and c.proc.poll() is None:
                if succeeds(url, probe.get("timeoutSeconds", 1)):
                    failing_since = None
                    continue
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > allowed:
                    self.liveness_failures.append(f"{c.name}: liveness {url} failed for {allowed} s (restarted)")
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
