"""ckptd's containers pass the restricted Pod Security profile; credentials arrive as read-only
files named by *_FILE variables; the grace period covers the trainer's last save and the drain."""

from __future__ import annotations

from typing import Any

import pytest
from charts import container, env_of, pod_template, render

KIND = "integration"

# Pod Security Standards, "restricted" (Kubernetes 1.29+): the rules that concern a pod spec.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def restricted_violations(pod: dict[str, Any], names: list[str]) -> list[str]:
    """Why the named containers of `pod` would be refused under the restricted profile ([] if not)."""
    found = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"pod: {flag}")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {v['name']}: {sorted(kinds)}")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("pod: seccomp Unconfined")
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        if c["name"] not in names:
            continue
        sc = c.get("securityContext") or {}
        where = c["name"]
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccomp {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities added {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: hostPort")
    return found


def spec_of(values: dict) -> dict:
    return pod_template(render(values))["spec"]


@pytest.mark.parametrize("kind", ["Job", "PyTorchJob", "JobSet"])
def test_ckptd_containers_pass_the_restricted_profile(kind: str) -> None:
    spec = spec_of({"workload": {"kind": kind}, "restore": {"enabled": True}, "storage": {"existingSecret": "s3"}})
    assert restricted_violations(spec, ["ckptd-restore", "ckptd"]) == []
    for name in ("ckptd-restore", "ckptd"):
        c = container(spec, name)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
        # A read-only root: the only writable places are volumes, and HOME is one of them.
        mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert "/tmp" in mounts and env_of(c)["HOME"] == "/tmp"


def test_the_checker_refuses_a_root_sidecar() -> None:
    # Helm merges a map into the defaults: null removes a default key.
    weakened = {"runAsUser": 0, "runAsNonRoot": None, "allowPrivilegeEscalation": True, "seccompProfile": None,
                "capabilities": {"drop": None, "add": ["SYS_ADMIN"]}}  # fmt: skip
    spec = spec_of({"ckptd": {"securityContext": weakened}})
    assert restricted_violations(spec, ["ckptd"]) == [
        "ckptd: allowPrivilegeEscalation is not false",
        "ckptd: runAsNonRoot is not true",
        "ckptd: runAsUser 0",
        "ckptd: seccomp None",
        "ckptd: capabilities not dropped",
        "ckptd: capabilities added ['SYS_ADMIN']",
    ]


def test_the_whole_pod_passes_with_a_hardened_trainer() -> None:
    hardened = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    spec = spec_of({"restore": {"enabled": True}, "trainer": {"securityContext": hardened}})
    assert restricted_violations(spec, [c["name"] for c in [*spec["initContainers"], *spec["containers"]]]) == []


def test_shared_folders_are_group_writable_through_fs_group() -> None:
    spec = spec_of({"restore": {"enabled": True}})
    assert spec["securityContext"]["fsGroup"] == container(spec, "ckptd")["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("mode", ["sidecar", "entrypoint"])
def test_credentials_are_read_only_files_named_by_file_variables(mode: str) -> None:
    storage = {"existingSecret": "minio", "accessKeyIdKey": "user", "secretAccessKeyKey": "pass",
               "sessionTokenKey": "token"}  # fmt: skip
    spec = spec_of({"mode": mode, "restore": {"enabled": True}, "storage": storage})
    (volume,) = [v for v in spec["volumes"] if v["name"] == "storage-credentials"]
    secret = volume["secret"]
    assert secret["secretName"] == "minio"
    files = {i["key"]: i["path"] for i in secret["items"]}
    assert files == {"user": "AWS_ACCESS_KEY_ID", "pass": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
    assert secret["defaultMode"] == 0o440
    readers = ["ckptd-restore", "ckptd"] if mode == "sidecar" else [spec["containers"][0]["name"]]
    for name in readers:
        c = container(spec, name)
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "storage-credentials"]
        assert mount["readOnly"] is True
        env = env_of(c)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            # A file the Secret's items put under the mount: what entrypoint.sh reads.
            assert var in files.values()
            assert env[f"{var}_FILE"] == f"{mount['mountPath']}/{var}", name
            assert var not in env, f"{name}: {var} itself must never be in the pod spec"
    if mode == "sidecar":
        trainer = spec["containers"][0]
        assert not any(m["name"] == "storage-credentials" for m in trainer["volumeMounts"])
        assert not any(k.startswith("AWS_") for k in env_of(trainer))


def test_without_a_secret_the_credential_chain_is_left_alone() -> None:
    spec = spec_of({"restore": {"enabled": True}})
    assert not any(v["name"] == "storage-credentials" for v in spec["volumes"])
    for c in [*spec["initContainers"], *spec["containers"]]:
        assert not any(k.startswith("AWS_") for k in env_of(c)), c["name"]


def test_secret_files_stay_readable_without_an_fs_group() -> None:
    spec = spec_of({"storage": {"existingSecret": "s"}, "podSecurityContext": None})
    (volume,) = [v for v in spec["volumes"] if v["name"] == "storage-credentials"]
    assert volume["secret"]["defaultMode"] == 0o444 and "securityContext" not in spec


@pytest.mark.parametrize(
    ("stop", "drain", "margin", "expected"),
    [(30, 300, 30, 360), (0, 0, 0, 0), (120, 600, 15, 735), (5, 3600, 30, 3635)],
    ids=["defaults", "zero", "long-save", "long-drain"],
)
@pytest.mark.parametrize("mode", ["sidecar", "entrypoint"])
def test_grace_period_is_last_save_plus_drain_plus_margin(mode, stop, drain, margin, expected) -> None:
    values = {"mode": mode, "trainer": {"stopTimeoutSeconds": stop}, "ckptd": {"drainTimeoutSeconds": drain},
              "gracePeriodMarginSeconds": margin}  # fmt: skip
    spec = spec_of(values)
    assert spec["terminationGracePeriodSeconds"] == expected
    ckptd = container(spec, "ckptd") if mode == "sidecar" else spec["containers"][0]
    assert env_of(ckptd)["CKPTD_DRAIN_TIMEOUT"] == str(drain)
    if mode == "entrypoint":
        # ckptd run waits this long for the trainer after forwarding SIGTERM, then kills it.
        assert env_of(ckptd)["CKPTD_STOP_TIMEOUT"] == str(stop)


def test_an_explicit_grace_period_wins() -> None:
    assert spec_of({"terminationGracePeriodSeconds": 900})["terminationGracePeriodSeconds"] == 900
