"""Which third-party models the model sweep measures, and how each is built with its inputs.

The list is computed, not written out: every architecture registered in timm, torchvision (classification)
and ultralytics (the bundled YAML configs) is instantiated once on the ``meta`` device (no memory, no weights)
to count its parameters and to check for a BatchNorm (any subclass of ``torch.nn.modules.batchnorm._BatchNorm``,
which includes timm's ``BatchNormAct2d``).  Architectures are grouped into *families*: the library's model
module plus the name's stem (:func:`family_of`: ``resnet18d -> resnet``, ``tf_efficientnet_b0 ->
tf_efficientnet``, ``mobileone_s0 -> mobileone``, ``ghostnetv2_100 -> ghostnetv2``).  Every family with at
least one BN member contributes its BN member with the fewest parameters (ties: the first name).  timm's
``test_*`` configs are left out (tiny smoke-test configurations, not architectures).  torchvision's
segmentation and detection models are the fixed list the sweep was asked for, with ``weights=None`` and
``weights_backbone=None``.

The scan takes a few minutes, so its rows are cached in a JSON file keyed by the library versions.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Name tokens that denote a size or variant letter rather than an architecture (``mixnet_s``, ``convnext_atto``).
SIZE_WORDS = frozenset(
    "a b c d e f g h s m l x n t xl xs xxs tiny small base large medium huge giant nano pico femto atto mini "
    "micro xtiny xxtiny xlarge".split())

SEGMENTATION = ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50")
DETECTION = ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
             "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")
#: R-CNN / RetinaNet resize every image to this size (default 800-1333) to keep a CPU forward pass short.
DETECTION_SIZE = 320
#: ultralytics configs whose models need a text encoder downloaded at build time (no network here).
YOLO_NEEDS_DOWNLOAD = ("world", "yoloe")
YOLO_INPUT = 256  # a multiple of 64, the largest stride of the P6 configs

#: A small hand-picked subset for ``--quick``: plain, re-parameterizable, TF-padded, untraceable and detection.
QUICK = ("timm:resnet10t", "timm:repvgg_a0", "timm:mobileone_s1", "timm:tf_efficientnet_b0", "timm:ghostnet_050",
         "tv:mobilenet_v3_small", "tv:lraspp_mobilenet_v3_large", "tv:ssdlite320_mobilenet_v3_large",
         "yolo:yolov8n")


@dataclass
class ModelSpec:
    """One model of the sweep: ``id`` is ``<source>:<name>``; ``kind`` says how it is built and called."""

    id: str
    source: str  # timm | torchvision | ultralytics | local
    name: str
    family: str
    kind: str = "image"  # image: model(x); detection: model([img]); yolo-cfg: ultralytics task model
    params: int = 0
    input_size: tuple[int, ...] = (3, 224, 224)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "input_size": tuple(d["input_size"])})


def family_of(name: str) -> str:
    """The architecture stem of a model name: its ``_`` tokens up to the first size token.

    A size token ends in digits (plus at most three letters or digits: ``b0``, ``050``, ``w18``, ``resnet26d``,
    ``50x4``) or is a size word (``s``, ``tiny``; not as the first token).  Its letters before the digits are
    kept when they name something (three letters or more: ``resnet18d -> resnet``, ``eca_vovnet39b ->
    eca_vovnet``).  A version suffix (``ghostnetv2``, ``mobilenetv4_conv``), a digit inside a word
    (``cs3darknet_focus``) and a first token too short to strip (``cs3se_edgenet``) are kept.
    """
    stem: list[str] = []
    for i, tok in enumerate(name.split("_")):
        if i and tok in SIZE_WORDS:
            break
        head = re.sub(r"(?<!v)\d+[a-z\d]{0,3}$", "", tok)
        if head == tok or (not stem and len(head) < 3):
            stem.append(tok)
            continue
        if len(head) >= 3 and head[0].isalpha():
            stem.append(head)
        break
    return "_".join(stem)


def yolo_family_of(stem: str) -> str:
    """``yolov10n -> yolov10``, ``yolov9c-seg -> yolov9-seg``, ``yolov3-tiny -> yolov3``, ``rtdetr-l -> rtdetr``."""
    head, *rest = stem.split("-")
    head = re.sub(r"(\d)[ntsmcblex]$", r"\1", head)
    return "-".join([head, *(t for t in rest if t not in SIZE_WORDS)])


# -- the registry scan -----------------------------------------------------------------------------------------
def _has_bn(model) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _no_init():
    """``torch.nn.init`` fills as no-ops: a CPU build then only allocates (untouched pages cost no memory)."""
    import torch

    saved = {k: getattr(torch.nn.init, k) for k in _INITS if hasattr(torch.nn.init, k)}
    try:
        for k in saved:
            setattr(torch.nn.init, k, lambda t, *a, **kw: t)
        yield
    finally:
        for k, f in saved.items():
            setattr(torch.nn.init, k, f)


def _meta_row(build, **extra) -> dict[str, Any]:
    """Parameters and BN presence of ``build()``, built on the meta device, else on the CPU without init
    (builders that compute with tensors, e.g. torchvision's RegNet widths or ultralytics' stride probe)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = build()
        except Exception:
            try:
                with _no_init(), torch.no_grad():
                    model = build()
            except Exception as err:
                return {**extra, "error": one_line(err)}
    return {**extra, "params": sum(p.numel() for p in model.parameters()), "bn": _has_bn(model),
            **({"input_size": list(model.pretrained_cfg["input_size"])}
               if getattr(model, "pretrained_cfg", None) else {})}


def scan_timm() -> list[dict[str, Any]]:
    import timm
    from timm.models import _registry

    rows = []
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        module = _registry._model_to_module.get(name, "?")
        rows.append(_meta_row(lambda n=name: timm.create_model(n, pretrained=False), source="timm", name=name,
                              module=module))
    return rows


def scan_torchvision() -> list[dict[str, Any]]:
    import torchvision

    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        row = _meta_row(lambda n=name: torchvision.models.get_model(n, weights=None), source="torchvision",
                        name=name, module=module)
        try:  # the crop size of the published weights (metadata only, nothing is downloaded)
            crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0]
        except Exception:
            crop = 224
        rows.append({**row, "input_size": [3, crop, crop]})
    for spec in torchvision_tasks():  # the fixed list; scanned for the parameter counts
        rows.append(_meta_row(lambda s=spec: build(s, 0)[0], source="torchvision", name=spec.name,
                              module=spec.family.split("/")[0], task=True))
    return rows


def yolo_configs() -> list[Path]:
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    return sorted(p for p in root.rglob("*.yaml") if not any(w in p.stem for w in YOLO_NEEDS_DOWNLOAD))


def _yolo_cfg(path: Path) -> tuple[str, str]:
    """``(scale, model name)`` of a config at its smallest scale: ``yolov8-seg.yaml -> ('n', 'yolov8n-seg')``."""
    import yaml

    scales = list((yaml.safe_load(path.read_text()) or {}).get("scales") or {})
    named = re.match(r"yolov?\d+([a-z])", path.stem)  # yolov10n.yaml: the scale is in the name
    if named or not scales:
        return (named.group(1) if named else ""), path.stem
    return scales[0], re.sub(r"^(yolov?\d+)", rf"\g<1>{scales[0]}", path.stem, count=1)


def scan_ultralytics() -> list[dict[str, Any]]:
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    rows = []
    for path in yolo_configs():
        scale, name = _yolo_cfg(path)
        config = path.relative_to(root).as_posix()
        rows.append(_meta_row(lambda c=config, s=scale: build_yolo(c, s), source="ultralytics", name=name,
                              module=path.parent.name, family_stem=yolo_family_of(path.stem), config=config,
                              scale=scale))
    return rows


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for mod in ("torch", "timm", "torchvision", "ultralytics"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


#: Bump when a scan function changes what it records: cached rows of that library are then rescanned.
SCAN_FORMAT = {"timm": 1, "torchvision": 1, "ultralytics": 3}
SCANS = {"timm": scan_timm, "torchvision": scan_torchvision, "ultralytics": scan_ultralytics}


def scanned_rows(cache: Path, refresh: bool = False, log=print) -> list[dict[str, Any]]:
    """Rows of every registered architecture, cached in ``cache`` per library (version and scan format)."""
    versions = library_versions()
    data = json.loads(cache.read_text()) if cache.exists() and not refresh else {}
    libs = data.get("libraries", {})
    rows: list[dict[str, Any]] = []
    changed = False
    for lib, scan in SCANS.items():
        key = {"version": versions.get(lib), "torch": versions["torch"], "format": SCAN_FORMAT[lib]}
        if versions.get(lib) is None:
            log(f"{lib} is not installed: its models are left out")
            continue
        if libs.get(lib, {}).get("key") != key:
            log(f"scanning the {lib} registry (meta device; a few minutes for timm)")
            libs[lib] = {"key": key, "rows": scan()}
            changed = True
        rows += libs[lib]["rows"]
    if changed:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"rule": __doc__, "libraries": libs}, indent=1))
    return rows


def family(row: dict[str, Any]) -> str:
    """``<model module>/<stem>`` of a scanned row."""
    stem = row["family_stem"] if row["source"] == "ultralytics" else family_of(row["name"])
    return f"{row['module']}/{stem}"


def select(rows: list[dict[str, Any]]) -> list[ModelSpec]:
    """The BN member with the fewest parameters of every family, then the fixed segmentation/detection list."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    params = {(r["source"], r["name"]): r.get("params", 0) for r in rows}
    for r in rows:
        if not r.get("bn") or r.get("task"):
            continue
        key = (r["source"], family(r))
        cur = best.get(key)
        if cur is None or (r["params"], r["name"]) < (cur["params"], cur["name"]):
            best[key] = r
    specs = []
    prefix = {"timm": "timm", "torchvision": "tv", "ultralytics": "yolo"}
    for r in sorted(best.values(), key=lambda r: (r["source"], family(r), r["name"])):
        kind = "yolo-cfg" if r["source"] == "ultralytics" else "image"
        size = tuple(r.get("input_size") or (3, YOLO_INPUT, YOLO_INPUT))
        kwargs = {"config": r["config"], "scale": r["scale"]} if kind == "yolo-cfg" else {}
        specs.append(ModelSpec(f"{prefix[r['source']]}:{r['name']}", r["source"], r["name"], family(r), kind,
                               r["params"], size, kwargs))
    if any(r["source"] == "torchvision" for r in rows):
        specs += [ModelSpec(**{**s.to_dict(), "params": params.get(("torchvision", s.name), 0)})
                  for s in torchvision_tasks()]
    return specs


def torchvision_tasks() -> list[ModelSpec]:
    specs = [ModelSpec(f"tv:{n}", "torchvision", n, f"segmentation/{n.split('_')[0]}") for n in SEGMENTATION]
    for n in DETECTION:
        kwargs = {} if n.startswith("ssd") else {"min_size": DETECTION_SIZE, "max_size": DETECTION_SIZE}
        size = 320 if n.startswith("ssd") else DETECTION_SIZE
        specs.append(ModelSpec(f"tv:{n}", "torchvision", n, f"detection/{n.split('_')[0]}", "detection",
                               input_size=(3, size, size), kwargs=kwargs))
    return specs


# -- building one model --------------------------------------------------------------------------------------
def build_yolo(config: str, scale: str):
    """An ultralytics task model from a bundled YAML config (path under ``cfg/models``) at ``scale``.

    Random init; nothing is downloaded (configs whose build would download are not scanned).
    """
    import ultralytics
    from ultralytics.nn import tasks

    cfg = tasks.yaml_model_load(Path(ultralytics.__file__).parent / "cfg" / "models" / config)
    cfg["scale"] = scale
    task = tasks.guess_model_task(cfg)
    cls = tasks.RTDETRDetectionModel if Path(config).stem.startswith("rtdetr") else {
        "detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "classify": tasks.ClassificationModel,
        "pose": tasks.PoseModel, "obb": tasks.OBBModel, "depth": tasks.DepthModel,
        "semantic": tasks.SemanticSegmentationModel}[task]
    return cls(cfg, verbose=False)


def build(spec: ModelSpec, seed: int):
    """``(model, args)``: the model with a fixed random init (not yet eval), and the positional call arguments."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.source == "timm":
            import timm

            model = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
        elif spec.source == "torchvision":
            import torchvision

            extra = {} if spec.kind == "image" and not spec.family.startswith("segmentation") \
                else {"weights_backbone": None}
            model = torchvision.models.get_model(spec.name, weights=None, **extra, **spec.kwargs)
        elif spec.source == "ultralytics":
            model = build_yolo(spec.kwargs["config"], spec.kwargs["scale"])
        elif spec.source == "local":  # tests: kwargs["factory"] is "module:attribute" of a model class/function
            import importlib

            mod, attr = spec.kwargs["factory"].split(":")
            model = getattr(importlib.import_module(mod), attr)()
        else:
            raise ValueError(f"unknown model source {spec.source!r}")
    if spec.kind == "detection":
        return model, ([torch.rand(spec.input_size, generator=gen)],)
    return model, (torch.randn((1, *spec.input_size), generator=gen),)


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
