"""fastclip's pixels pinned to open_clip's preprocessing, measured on real photographs.

open_clip decodes with PIL and resizes with PIL's bicubic (``open_clip.transform.image_transform``); fastclip decodes
with torchvision or DALI and resizes with their kernels. Val: the mean absolute error, in 0-255 levels, between each
loader's output and open_clip's, on scikit-image's bundled photographs encoded as JPEG (quality 95) and as PNG
(lossless, so the resize alone). Train: the crop windows each loader draws, read back from a PNG whose pixels are
their own coordinates, against the windows of open_clip's ``RandomResizedCrop``. ``pytest -s`` prints the tables.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data.build import dali_available
from fastclip.data.loader import LoaderOptions
from fastclip.data.torch_loader import _decode, prepare
from fastclip.model import ImageSpec

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's OpenAI ones
HAS_DALI = dali_available()
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="needs nvidia-dali")

# "torch-float" is the torch loader's GPU-decode path (it resamples in float there), run on the CPU
VAL_LOADERS = ["torch", "torch-float", "dali"]
VAL_SIZES = [224, 97]  # the usual one, and one that divides nothing
FORMATS = ["JPEG", "PNG"]
# Mean absolute error against open_clip, in levels, on every photo, size and format; measured (JPEG and PNG alike):
# torch 0.001-0.005 (torchvision's uint8 CPU kernel is a port of PIL's; no pixel over 1 level), torch-float
# 0.08-0.19 (0.25-0.32 before prepare() rounded and clipped), dali 0.09-0.19 (its own cubic kernel; single pixels up
# to 7 levels off, at edges and image borders)
VAL_BOUNDS = {"torch": 0.03, "torch-float": 0.25, "dali": 0.25}
# JPEG decoding, on the whole image: PIL, torchvision and DALI's CPU decoder all run libjpeg-turbo's ISLOW IDCT with
# fancy upsampling, and were measured bit-identical on every photo. nvJPEG (the GPU decode) is not measured here.
DECODE_BOUND = 0.05


def _photos() -> dict[str, np.ndarray]:
    """Photographs of varied size shipped in scikit-image's wheel (no download): colour, grey, one under 224 on its
    short side (upsampled), one portrait."""
    data = pytest.importorskip("skimage.data")
    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "text")}
    photos["rocket-portrait"] = np.ascontiguousarray(np.rot90(photos["rocket"]))
    return photos


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def _levels(images: torch.Tensor) -> np.ndarray:
    """Normalized [..., 3, S, S] -> 0-255 levels, float64."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((images.cpu().float() * std + mean) * 255).double().numpy()


def _spec(size: int) -> ImageSpec:
    return ImageSpec(size=size, mean=MEAN, std=STD)


def _open_clip(encoded: bytes, size: int) -> np.ndarray:
    from open_clip.transform import image_transform

    return _levels(image_transform(size, is_train=False, mean=MEAN, std=STD)(Image.open(io.BytesIO(encoded))))


def _torch(encoded: bytes, size: int, *, float_path: bool, train: bool = False, crop_scale=(0.9, 1.0)) -> torch.Tensor:
    image = _decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    return prepare(image.float() if float_path else image, _spec(size), crop_scale, train)


def _dali(
    encoded: list[bytes], size: int, *, train: bool = False, crop_scale=(0.9, 1.0), seed: int = 0
) -> torch.Tensor:
    """The DALI loader's decode pipeline on the CPU, one batch of ``encoded``."""
    from fastclip.data.dali_pipelines import decode_pipeline, to_torch

    options = LoaderOptions(
        batch_size=len(encoded), workers=2, shuffle_buffer=1, decode_device="cpu", crop_scale=crop_scale,
        max_bad_fraction=0.0,
    )  # fmt: skip
    pipe = decode_pipeline(options=options, image=_spec(size), train=train, seed=seed)
    pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
    pipe.schedule_run()
    (images,) = pipe.outputs()
    return to_torch(images, torch.device("cpu"))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return _photos()


@pytest.fixture(scope="module")
def val_errors(photos) -> dict[tuple[str, str, int, str], float]:
    """{(loader, format, size, photo): mean absolute error against open_clip, in levels}; printed as a table."""
    errors = {}
    loaders = [name for name in VAL_LOADERS if name != "dali" or HAS_DALI]
    for fmt in FORMATS:
        encoded = {name: _encode(pixels, fmt) for name, pixels in photos.items()}
        for size in VAL_SIZES:
            dali = _levels(_dali(list(encoded.values()), size)) if HAS_DALI else None
            for i, (name, data) in enumerate(encoded.items()):
                reference = _open_clip(data, size)
                outputs = {
                    "torch": _levels(_torch(data, size, float_path=False)),
                    "torch-float": _levels(_torch(data, size, float_path=True)),
                    "dali": dali[i] if dali is not None else None,
                }
                for loader in loaders:
                    errors[loader, fmt, size, name] = float(np.abs(outputs[loader] - reference).mean())
    print("\nval: mean absolute error against open_clip's eval transform, in 0-255 levels (JPEG / PNG)")
    print(f"{'photo':16} {'H x W':>10} {'size':>4}" + "".join(f" {loader:>15}" for loader in loaders))
    for name, pixels in photos.items():
        for size in VAL_SIZES:
            cells = "".join(
                f" {errors[loader, 'JPEG', size, name]:7.3f}/{errors[loader, 'PNG', size, name]:.3f}"
                for loader in loaders
            )
            print(f"{name:16} {pixels.shape[0]:>4} x {pixels.shape[1]:<3} {size:>4}{cells}")
    return errors


@pytest.mark.parametrize("loader", ["torch", "torch-float", pytest.param("dali", marks=needs_dali)])
def test_val_pixels_match_open_clip(val_errors, photos, loader):
    worst = max((e, key) for key, e in val_errors.items() if key[0] == loader)
    assert worst[0] < VAL_BOUNDS[loader], f"{loader} is {worst[0]:.3f} levels off open_clip at {worst[1]}"
    # decode against resize: the decoders agree with PIL's, so a JPEG is no further off than its lossless PNG
    for size in VAL_SIZES:
        for name in photos:
            jpeg, png = val_errors[loader, "JPEG", size, name], val_errors[loader, "PNG", size, name]
            assert abs(jpeg - png) < DECODE_BOUND, f"{loader}, {name} at {size}: JPEG {jpeg:.3f}, PNG {png:.3f} levels"


def _decode_dali(encoded: list[bytes]) -> list[np.ndarray]:
    """DALI's CPU image decoder, as decode_pipeline runs it, without the resize."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(encoded), num_threads=2, device_id=None)
    def pipeline():
        return fn.decoders.image(fn.external_source(name="encoded"), device="cpu", output_type=types.RGB)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
    (images,) = pipe.run()
    return [np.array(images[i]) for i in range(len(encoded))]


@pytest.mark.parametrize(
    "decoder", ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="needs nvidia-dali"))]
)
def test_jpeg_decoders_match_pil(photos, decoder):
    encoded = {name: _encode(pixels, "JPEG") for name, pixels in photos.items()}
    if decoder == "dali":
        decoded = _decode_dali(list(encoded.values()))
    else:
        decoded = [_decode(torch.frombuffer(bytearray(d), dtype=torch.uint8)).permute(1, 2, 0).numpy()
                   for d in encoded.values()]  # fmt: skip
    print(f"\ndecode ({decoder}): mean absolute error against PIL's decode of the same JPEG, whole image, in levels")
    for (name, data), pixels in zip(encoded.items(), decoded):
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        error = float(np.abs(pixels.astype(np.float64) - pil).mean())
        print(f"{name:16} {error:.3f}")
        assert error < DECODE_BOUND, f"{decoder} decodes {name} {error:.3f} levels away from PIL"


# Train crops. The source is a PNG whose red channel is the column and green the row (so at most 256 a side): an
# output pixel i of a crop (x, y, w, h) resized to S sits at x + (i + 0.5) * w / S - 0.5 in the source, the
# half-pixel-centre convention of PIL, torchvision and DALI, and its red level is that coordinate. A straight line
# fitted to the red levels along a row gives w from its slope and x from its intercept (green: h and y), to within
# a pixel (checked against the torch sampler's own draws: 0.05-0.2 px mean, 1 px at most).
CROP_SIZE, CROP_MARGIN = 64, 4  # the outer pixels are left out of the fit: there the bicubic kernel is clamped
CROP_SHAPES = [(240, 240), (170, 255), (256, 160)]  # H, W: square; 3:2 and 5:8, outside the 3/4-4/3 ratios
CROP_SCALES = [(0.9, 1.0), (0.08, 1.0)]  # open_clip's default and the ImageNet one
CROPS, REFERENCE_CROPS = 400, 2000
# Each window feature's tolerance: how far apart two draws may be and still count as one (the read-back is within a
# pixel; 0.01 of the width is 1.6-2.6 px here)
FEATURE_TOLERANCE = {"area": 0.01, "log_aspect": 0.01, "centre_x": 0.01, "centre_y": 0.01}
# The Kolmogorov-Smirnov distance (with the tolerance above) between a loader's windows and open_clip's: for the same
# sampler and these sample sizes it stays under 0.107 with probability 0.999. Measured: torch <= 0.03, dali <= 0.04;
# DALI's stock image_random_crop was 0.41 and 0.45 off on the crop centre of the 3:2 and 5:8 images at scale (0.9, 1),
# where every draw falls back to a window that torchvision centres and DALI placed at random.
CROP_BOUND = 0.11


def _coordinates_png(height: int, width: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    return _encode(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8), "PNG")


def _windows(levels: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] levels of crops of the coordinate image -> [N, 4] windows (x, y, w, h) in source pixels."""
    keep = slice(CROP_MARGIN, CROP_SIZE - CROP_MARGIN)
    centres = np.arange(CROP_SIZE)[keep] + 0.5
    columns = levels[:, 0].mean(axis=1)[:, keep]  # red along a row, averaged over rows
    rows = levels[:, 1].mean(axis=2)[:, keep]
    (x_slope, x_cut), (y_slope, y_cut) = np.polyfit(centres, columns.T, 1), np.polyfit(centres, rows.T, 1)
    return np.stack([x_cut + 0.5, y_cut + 0.5, x_slope * CROP_SIZE, y_slope * CROP_SIZE], axis=1)


def _crop_statistics(windows: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    x, y, w, h = windows.T
    return {
        "area": w * h / (width * height),
        "log_aspect": np.log(w / h),
        "centre_x": (x + w / 2) / width,
        "centre_y": (y + h / 2) / height,
    }


def _ks(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """sup_z of F_a(z) - F_b(z + tolerance) and the same with a and b swapped: the two-sample Kolmogorov-Smirnov
    statistic made blind to shifts under ``tolerance``, so that the read-back's sub-pixel noise around the point
    masses (the fallback's one window) does not count. The sup is reached at a sample point of the first argument."""
    a, b = np.sort(a), np.sort(b)
    a_over_b = np.searchsorted(a, a, side="right") / len(a) - np.searchsorted(b, a + tolerance, side="right") / len(b)
    b_over_a = np.searchsorted(b, b, side="right") / len(b) - np.searchsorted(a, b + tolerance, side="right") / len(a)
    return float(max(a_over_b.max(), b_over_a.max(), 0.0))


def _reference_windows(shape: tuple[int, int], scale: tuple[float, float], n: int, seed: int) -> np.ndarray:
    """Windows (x, y, w, h) drawn by the RandomResizedCrop of open_clip's train transform, exactly (no read-back)."""
    from open_clip.transform import image_transform

    crop = image_transform(CROP_SIZE, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": scale}).transforms[0]
    image = torch.empty(1, *shape)  # get_params reads only its size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drawn = [crop.get_params(image, crop.scale, crop.ratio) for _ in range(n)]
    return np.array([(x, y, w, h) for y, x, h, w in drawn], dtype=np.float64)


def _loader_windows(loader: str, shape: tuple[int, int], scale: tuple[float, float], n: int, seed: int) -> np.ndarray:
    """Windows read back from ``n`` training crops of the coordinate image by ``loader``."""
    encoded = _coordinates_png(*shape)
    if loader == "dali":
        return _windows(_levels(_dali([encoded] * n, CROP_SIZE, train=True, crop_scale=scale, seed=seed)))
    image = _decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))  # once: prepare() draws the crop
    with torch.random.fork_rng(devices=[]):  # prepare() draws from torch's global generator, as in a worker
        torch.manual_seed(seed)
        crops = torch.stack([prepare(image, _spec(CROP_SIZE), scale, True) for _ in range(n)])
    return _windows(_levels(crops))


@pytest.fixture(scope="module")
def crop_distances() -> dict[tuple[str, tuple, tuple], dict[str, float]]:
    """{(loader, shape, scale): {feature: KS distance to open_clip's windows}}; printed with quantiles."""
    distances = {}
    loaders = ["torch", "dali"] if HAS_DALI else ["torch"]
    quantiles = [0.05, 0.5, 0.95]
    print(f"\ntrain: crop windows against open_clip's RandomResizedCrop ({CROPS} crops, {REFERENCE_CROPS} for it)")
    for shape in CROP_SHAPES:
        for scale in CROP_SCALES:
            reference = _crop_statistics(_reference_windows(shape, scale, REFERENCE_CROPS, seed=0), *shape)
            drawn = {"open_clip": reference}
            for loader in loaders:
                drawn[loader] = _crop_statistics(_loader_windows(loader, shape, scale, CROPS, seed=1), *shape)
                distances[loader, shape, scale] = {
                    k: _ks(drawn[loader][k], reference[k], FEATURE_TOLERANCE[k]) for k in reference
                }
            print(f"{shape[0]} x {shape[1]}, scale {scale}: 5/50/95% quantiles; KS distance to open_clip")
            for name, features in drawn.items():
                cells = "  ".join(
                    f"{k} {'/'.join(f'{q:.3f}' for q in np.quantile(v, quantiles))}" for k, v in features.items()
                )
                ks = distances.get((name, shape, scale))
                print(
                    f"  {name:9} {cells}" + ("" if ks is None else "  KS " + " ".join(f"{d:.3f}" for d in ks.values()))
                )
    return distances


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=needs_dali)])
def test_train_crops_follow_open_clips_sampler(crop_distances, loader):
    for (name, shape, scale), distances in crop_distances.items():
        if name == loader:
            for feature, distance in distances.items():
                assert distance < CROP_BOUND, (
                    f"{loader} crops of a {shape} image at scale {scale}: {feature} {distance}"
                )


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=needs_dali)])
def test_a_fixed_crop_scale_gives_open_clips_windows(loader):
    """data.crop_scale [1, 1], which the config and the torch loader take: DALI's uniform refuses the empty range
    ('Invalid range [1, 1)'), so the DALI loader stopped at its first batch. Every draw is then the whole image's
    area, so every window is the one torchvision picks: the whole image, or its centre clipped to 3/4-4/3."""
    for shape in CROP_SHAPES:
        drawn = _loader_windows(loader, shape, (1.0, 1.0), 8, seed=1)
        reference = _reference_windows(shape, (1.0, 1.0), 8, seed=0)
        assert np.abs(drawn - reference).max() < 1, f"{loader} at {shape}: {drawn[0]} against {reference[0]}"


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_exif_orientation_is_ignored_as_open_clip_does(photos, loader):
    """A phone photo's EXIF orientation tag: PIL as open_clip opens it, and torchvision, leave the pixels as stored;
    DALI would rotate them (its decoders' default), giving the two loaders different images of one sample."""
    if loader == "dali" and not HAS_DALI:
        pytest.skip("needs nvidia-dali")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(out, format="JPEG", quality=95, exif=exif)
    encoded = out.getvalue()
    ours = _levels(_torch(encoded, 97, float_path=False) if loader == "torch" else _dali([encoded], 97))
    assert np.abs(ours - _open_clip(encoded, 97)).mean() < VAL_BOUNDS[loader]
