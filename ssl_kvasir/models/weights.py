"""ImageNet weights for clusters without internet: fetch them once where there is, load them from a file.

``ssl-kvasir weights fetch NAME --out DIR`` (on a login node, say) asks timm for ``NAME``'s pretrained weights
(from the Hugging Face hub, the way ``backbone.pretrained=true`` does) and writes the headless backbone's
state dict to ``DIR/<NAME>.pth``, the file ``backbone.weights=`` takes: ``models.backbone.load_weights``
checks it key by key against the architecture. An ensemble (``resnet152+densenet161``) gets one file per part,
in order, as ``backbone.weights=[a.pth,b.pth]`` takes them.
"""

from __future__ import annotations

from pathlib import Path

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.files import atomic_write


def fetch_weights(name: str, out: str | Path) -> list[Path]:
    """Download timm's pretrained weights of each part of ``name`` and write them to ``out/<part>.pth``.

    Args:
        name: a timm model name, or several joined by ``+`` (an ensemble), optionally with a pretrained tag
            (``resnet50.a1_in1k``).
        out: the folder for the files (created).

    Returns:
        the written files, one per part.

    Raises:
        ConfigError: naming the model, when timm does not know it or cannot get its weights.
    """
    import timm
    import torch

    out = Path(out)
    files = []
    for part in (n.strip() for n in name.split("+")):
        try:
            model = timm.create_model(part, pretrained=True, num_classes=0)
        except Exception as e:  # noqa: BLE001 - timm and the hub raise many kinds; one line names the model
            raise ConfigError(
                f"could not get pretrained weights for {part!r} ({type(e).__name__}: {e}); "
                "run this where the Hugging Face hub can be reached"
            ) from None
        path = out / f"{part}.pth"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
        files.append(path)
    return files


def weights_override(files: list[Path]) -> str:
    """The override that loads ``files``: ``backbone.weights=FILE`` or ``backbone.weights=[A,B]``."""
    paths = [str(Path(f).resolve()) for f in files]
    return f"backbone.weights={paths[0]}" if len(paths) == 1 else f"backbone.weights=[{','.join(paths)}]"
