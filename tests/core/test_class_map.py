"""ClassMap: training slot <-> dataset category id <-> name."""

from __future__ import annotations

import pytest

from rfdetr_core.class_map import ClassEntry, ClassMap
from rfdetr_core.errors import RFDETRError


def test_sparse_coco_categories_get_contiguous_slots():
    cm = ClassMap.from_coco_categories(
        [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}, {"id": 90, "name": "c"}]
    )
    assert cm.names == ["a", "b", "c"]
    assert cm.category_ids == [3, 7, 90]
    assert [cm.slot(c) for c in (3, 7, 90)] == [0, 1, 2]
    assert cm.category_id(1) == 7 and cm.name(2) == "c"
    assert cm.num_slots == 3 and len(cm) == 3


def test_identity_map_of_upstream_weights_has_gaps():
    cm = ClassMap.identity([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}], num_slots=91)
    assert cm.num_slots == 91
    assert cm.category_id(3) == 3 and cm.category_id(2) is None and cm.name(0) is None
    table = cm.slot_to_category_table()
    assert len(table) == 91 and table[1] == 1 and table[2] == -1


def test_json_round_trip_and_errors():
    cm = ClassMap.from_names(["x", "y"], first_category_id=1)
    assert ClassMap.from_json(cm.to_json()) == cm
    with pytest.raises(RFDETRError, match="Malformed class map"):
        ClassMap.from_json({"classes": [{"slot": 0}]})
    with pytest.raises(RFDETRError, match="duplicate category ids"):
        ClassMap([ClassEntry(0, 5, "a"), ClassEntry(1, 5, "b")])
    with pytest.raises(RFDETRError, match="duplicate slots"):
        ClassMap([ClassEntry(0, 1, "a"), ClassEntry(0, 2, "b")])
    with pytest.raises(RFDETRError, match="not in the class map"):
        cm.slot(42)
    with pytest.raises(RFDETRError, match="smaller than"):
        ClassMap([ClassEntry(4, 1, "a")], num_slots=2)
