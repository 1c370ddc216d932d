"""Reading which shard files a DCP `.metadata` names, without unpickling it."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import pytest

from daemon.catalog.shards import MAX_METADATA_BYTES, is_metadata, shard_files

KIND = "unit"


# The shape DCP pickles (torch.distributed.checkpoint.metadata / filesystem), without torch.
@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    index: int | None = None


@dataclass
class _StorageInfo:
    relative_path: str
    offset: int
    length: int


@dataclass
class Metadata:
    state_dict_metadata: dict
    storage_data: dict = field(default_factory=dict)


def metadata_naming(*paths: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    storage = {MetadataIndex(f"w{i}", 0): _StorageInfo(p, 16 * i, 16) for i, p in enumerate(paths)}
    # A state-dict key may be named like the field: its value is no file name.
    return pickle.dumps(Metadata({"relative_path": "a key, not a file"}, storage), protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_named_file_once_whatever_the_protocol(protocol):
    # The same file named three times comes back from the pickle's memo after the first.
    data = metadata_naming("__0_0.distcp", "__1_0.distcp", "__0_0.distcp", "__0_0.distcp", protocol=protocol)
    assert shard_files(data) == {"__0_0.distcp", "__1_0.distcp"}


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "not a pickle"),
        (b"not a pickle at all", "not a pickle"),
        (metadata_naming("__0_0.distcp")[:-9], "not a pickle"),  # truncated
        (pickle.dumps({"state": 1}), "names no shard file"),
        (metadata_naming("../../etc/passwd.distcp"), "unsafe path"),
        (metadata_naming("/abs.distcp"), "unsafe path"),
        (metadata_naming("model.bin"), "names no shard file"),  # not a FileSystemWriter's name
    ],
)
def test_anything_else_is_refused(data, why):
    with pytest.raises(ValueError, match=why):
        shard_files(data)


def test_a_huge_file_is_refused_before_it_is_scanned():
    with pytest.raises(ValueError, match="larger than"):
        shard_files(b"\0" * (MAX_METADATA_BYTES + 1))


def test_nothing_in_it_runs():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    data = pickle.dumps([Boom(), _StorageInfo("__0_0.distcp", 0, 1)])
    assert shard_files(data) == {"__0_0.distcp"}


@pytest.mark.parametrize(
    "relpath, expected",
    [("step-3/.metadata", True), ("step-3/__0.metadata", False), (".metadata", False), ("a/b/.metadata", True)],
)
def test_is_metadata(relpath, expected):
    assert is_metadata(relpath) is expected


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a one-process save, as meant
def test_a_real_dcp_save(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.zeros(4), "nested": {"b": torch.ones(2, 2)}, "step": 3, "name": "x.distcp"}
    dcp.save(state, checkpoint_id=str(tmp_path / "step-3"), no_dist=True)
    written = {p.name for p in (tmp_path / "step-3").iterdir() if p.name.endswith(".distcp")}
    assert shard_files((tmp_path / "step-3" / ".metadata").read_bytes()) == written == {"__0_0.distcp"}
