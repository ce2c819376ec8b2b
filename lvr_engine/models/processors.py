"""Loading VLM processors, including where torchvision is missing.

transformers 5.23 builds Qwen2-VL processors with a video processor that needs torchvision; this
machine (and many CPU-only installs) has none. ``load_processor`` falls back to assembling the same
processor from the saved tokenizer, PIL image processor and chat template (images work, videos do not).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision build that does not match torch
        return False
    return True


def _allow_processor_without_torchvision() -> None:
    """transformers 5.23 cannot build *any* processor with a ``video_processor`` slot (Qwen2-VL's)
    without torchvision: ``ProcessorMixin`` looks ``VideoProcessorMixin`` up on its private copy of
    the transformers module, where it is only exported when torchvision is installed, and the fallback
    lookup crashes on the dummy ``VIDEO_PROCESSOR_MAPPING``. The class itself imports fine; export it
    there. Idempotent, and a no-op when torchvision is installed."""
    import transformers.processing_utils as pu
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(pu.transformers_module, "VideoProcessorMixin"):
        pu.transformers_module.VideoProcessorMixin = VideoProcessorMixin


def _video_stand_in():
    """Stands in for Qwen2VLVideoProcessor when torchvision is missing (images still work; videos do not)."""
    from transformers.video_processing_utils import VideoProcessorMixin

    _allow_processor_without_torchvision()
    return VideoProcessorMixin()


def _processor_class(family_or_name: str):
    import transformers

    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(family_or_name, family_or_name)
    if name not in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"):
        raise ValueError(f"family must be 'qwen2_vl' or 'qwen2_5_vl', got {family_or_name!r}")
    return getattr(transformers, name)


def load_processor(path: str | os.PathLike):
    """``AutoProcessor.from_pretrained(path)``, or, where that fails only because torchvision is not
    installed (transformers 5.23 loads Qwen2-VL's video processor unconditionally), the same processor
    assembled from the saved parts: ``AutoTokenizer`` + the PIL ``AutoImageProcessor`` + the chat
    template, with a stand-in video processor. Works for any local Qwen2-VL / Qwen2.5-VL checkpoint."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ValueError, ImportError) as e:
        if "torchvision" not in str(e).lower():
            raise
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(path)
    pcfg = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").exists() else {}
    proc_cls = _processor_class(pcfg.get("processor_class", "Qwen2VLProcessor"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    chat_template = None
    if (path / "chat_template.jinja").exists():
        chat_template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").exists():
        chat_template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=_video_stand_in(),
                    chat_template=chat_template)


def save_processor(processor, dest: str | os.PathLike, source: str | os.PathLike) -> None:
    """``processor.save_pretrained(dest)``; where the processor carries the stand-in video processor (no
    torchvision here), the saved ``processor_config.json`` takes the ``video_processor`` entry of checkpoint
    ``source``'s, when it has one, so ``dest`` loads with plain AutoProcessor wherever torchvision is installed."""
    processor.save_pretrained(dest)
    saved, src = Path(dest) / "processor_config.json", Path(source) / "processor_config.json"
    if not (saved.exists() and src.exists()):
        return
    cfg, src_cfg = json.loads(saved.read_text()), json.loads(src.read_text())
    vp = cfg.get("video_processor")
    stand_in = isinstance(vp, dict) and vp.get("video_processor_type") == "VideoProcessorMixin"
    if stand_in and "video_processor" in src_cfg:
        cfg["video_processor"] = src_cfg["video_processor"]
        saved.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
