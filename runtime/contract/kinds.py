"""Model kinds: what a bundle of each kind holds and how the runtime runs it.

The rest of the code asks a :class:`ModelKind` and never compares kind names. The training side
adds its own behaviour per kind (network, loss, points) in ``imunet/kinds.py`` and the exporter
asks the same object which graphs to write and check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    """One model kind.

    ``graphs``: the graphs its bundle holds, the first taking the patch. ``decodes_points``: the
    network is an encoder plus a decoder at points (the runtime's adaptive, sparse and dense modes
    apply, and backends keep features between the two); otherwise one dense graph maps a patch to
    class logits (``predict_dense``). ``default_mode``: the inference mode its bundles default to.
    """

    name: str
    graphs: tuple[str, ...]
    decodes_points: bool
    default_mode: str

    @property
    def entry_graph(self) -> str:
        """The graph that takes the image patch."""
        return self.graphs[0]

    @property
    def mode_label(self) -> str:
        """What the run header and the statistics call a dense model's single mode."""
        return "dense-model"

    def mode_of(self, settings_mode: str) -> str:
        """The mode a run of this kind reports: the settings' for point decoders, else the dense model's."""
        return settings_mode if self.decodes_points else self.mode_label


IMPLICIT = ModelKind("implicit", ("encoder", "decoder"), decodes_points=True, default_mode="adaptive")
UNET = ModelKind("unet", ("model",), decodes_points=False, default_mode="dense")
KINDS: dict[str, ModelKind] = {k.name: k for k in (IMPLICIT, UNET)}


def model_kind(name: str) -> ModelKind:
    """The kind called ``name``; ValueError for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"model kind must be one of {tuple(KINDS)}, got {name!r}") from None
