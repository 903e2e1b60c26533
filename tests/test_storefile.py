"""The store's record in its data dir (cluster/storefile.py). No Ray needed.
Run: python -m pytest tests/test_storefile.py -q
"""

from __future__ import annotations

import pytest

from cluster import storefile
from memstore.errors import InvalidArgument


def test_round_trip_replaces_the_record_whole(tmp_path):
    assert storefile.read(tmp_path) is None and storefile.check_resume(tmp_path, "s", 2) is None
    storefile.write(tmp_path, {"store": "s", "num_shards": 2, "came_up": True, "recovery": {"version": 1}})
    storefile.write(tmp_path, {"store": "s", "num_shards": 2, "came_up": True, "recovery": {"version": 3}})
    assert storefile.read(tmp_path)["recovery"] == {"version": 3}
    assert storefile.check_resume(tmp_path, "s", 2)["format"] == storefile.FORMAT
    assert [p.name for p in tmp_path.iterdir()] == [storefile.STORE_FILE]  # no temporary file left


def test_another_store_another_count_or_a_damaged_record_is_refused(tmp_path):
    storefile.write(tmp_path, {"store": "s", "num_shards": 2})
    with pytest.raises(InvalidArgument, match=r"holds store 's', not 't'"):
        storefile.check_resume(tmp_path, "t", 2)
    with pytest.raises(InvalidArgument, match=r"holds store 's' of 2 shards, not 4: bring it up with --shards 2"):
        storefile.check_resume(tmp_path, "s", 4)
    storefile.path(tmp_path).write_text('{"store": "s", "num_sh')  # torn by hand: never ignored
    with pytest.raises(InvalidArgument, match=r"cannot read the store record .*store\.json"):
        storefile.check_resume(tmp_path, "s", 2)
    storefile.path(tmp_path).write_text('{"store": "s"}')
    with pytest.raises(InvalidArgument, match=r"not a memstore store record of format 1"):
        storefile.read(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match=r"is not a directory"):
        storefile.read(tmp_path / "file")
