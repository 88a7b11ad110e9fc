"""What `strict: true` does to a schema: every object that lists its properties takes no others."""

from __future__ import annotations

import copy

from shared.protocol.structured import closed

ITEM = {"type": "object", "properties": {"sku": {"type": "string"}}}
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": ITEM},
        "either": {"anyOf": [ITEM, {"type": "null"}]},
        "ref": {"$ref": "#/$defs/Item"},
        "free": {"type": "object"},
        "open": {**ITEM, "additionalProperties": True},
        "maps": {"type": "object", "additionalProperties": ITEM},
        "properties": ITEM,  # a property called "properties"
    },
    "$defs": {"Item": ITEM},
}


def test_every_object_with_properties_is_closed_and_the_rest_left_as_they_were() -> None:
    before = copy.deepcopy(SCHEMA)
    out = closed(SCHEMA)
    assert SCHEMA == before  # the request's own schema is not changed
    shut = {**ITEM, "additionalProperties": False}
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["items"]["items"] == shut
    assert props["either"]["anyOf"] == [shut, {"type": "null"}]
    assert out["$defs"]["Item"] == shut and props["ref"] == {"$ref": "#/$defs/Item"}
    assert props["free"] == {"type": "object"}  # any object: nothing listed, nothing to close
    assert props["open"]["additionalProperties"] is True  # the schema's own word stands
    assert props["maps"]["additionalProperties"] == shut  # a map's values are closed, the map is not
    assert props["properties"] == shut
    assert set(props) == set(SCHEMA["properties"])  # no key was added to a map of properties
