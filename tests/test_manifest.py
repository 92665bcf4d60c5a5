"""The typed manifest: one contract for the exporter, the runtime and the JSON Schema."""

import json
from dataclasses import MISSING, fields

import pytest

from imunet.runtime.contract.bundle import default_bundle_path
from imunet.runtime.contract.manifest import (
    SCHEMA_PATH,
    DecoderSpec,
    EncoderSpec,
    EngineRecord,
    GraphSpec,
    Manifest,
    Provenance,
    Variant,
)
from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.imaging.preprocess import Normalization

SCHEMA = json.loads(SCHEMA_PATH.read_text())
PROPS = SCHEMA["properties"]
SECTIONS = [
    (SCHEMA, Manifest),
    (PROPS["normalization"], Normalization),
    (PROPS["encoder"], EncoderSpec),
    (PROPS["decoder"], DecoderSpec),
    (PROPS["graphs"]["additionalProperties"], GraphSpec),
    (PROPS["inference"], InferenceSettings),
    (PROPS["provenance"], Provenance),
    (PROPS["variants"]["additionalProperties"], Variant),
    (PROPS["engines"]["items"], EngineRecord),
]


def serialised(cls):
    return [f for f in fields(cls) if f.metadata.get("serialise", True)]


# written by every exporter, so required on disk; defaulted in the dataclass, which is built before hashing
ALWAYS_WRITTEN = {Manifest: {"format", "format_version", "files"}}


@pytest.mark.parametrize("section, cls", SECTIONS, ids=[c.__name__ for _, c in SECTIONS])
def test_schema_and_dataclasses_name_the_same_fields(section, cls):
    assert set(section["properties"]) == {f.name for f in serialised(cls)}
    required = {f.name for f in serialised(cls) if f.default is MISSING and f.default_factory is MISSING}
    assert set(section["required"]) == required | ALWAYS_WRITTEN.get(cls, set())
    assert section.get("additionalProperties") is False


def test_shipped_manifest_round_trips_and_validates():
    jsonschema = pytest.importorskip("jsonschema")
    raw = json.loads((default_bundle_path() / "manifest.json").read_text())
    m = Manifest.from_dict(raw)
    assert m.notes == ()
    assert Manifest.from_dict(m.to_dict()) == m
    jsonschema.validate(m.to_dict(), SCHEMA)


def test_malformed_fields_are_named():
    raw = json.loads((default_bundle_path() / "manifest.json").read_text())
    for edit, message in [
        (lambda d: d.update(spacing=[1, 1]), "manifest.spacing must have 3 entries"),
        (lambda d: d["decoder"].update(width="wide"), "manifest.decoder.width must be a number"),
        (lambda d: d.pop("encoder"), "manifest lacks 'encoder'"),
        (lambda d: d.update(model_kind="gan"), "model kind must be one of .*got 'gan'"),
        (lambda d: d["labels"].pop("1"), "labels must be 0..C-1"),
        (lambda d: d.update(lateral_pairs=[[1, 1]]), "lateral_pairs must pair distinct foreground labels"),
        (lambda d: d.update(lateral_pairs=[[1, 2]], orientation=None), "lateral_pairs needs the manifest"),
    ]:
        bad = json.loads(json.dumps(raw))
        edit(bad)
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict(bad)


def test_unknown_keys_load_with_a_note_and_unknown_settings_are_refused():
    raw = json.loads((default_bundle_path() / "manifest.json").read_text())
    raw["colour"] = "blue"
    m = Manifest.from_dict(raw)
    assert m.inference == InferenceSettings()
    assert m.notes == ("manifest key 'colour' is not known to this runtime and was ignored",)
    raw["inference"].update(halo=0)
    with pytest.raises(ValueError, match="unknown inference settings: halo"):
        Manifest.from_dict(raw)
