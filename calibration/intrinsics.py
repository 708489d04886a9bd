"""Camera intrinsics from ChArUco images: detection, cv2.calibrateCamera, error gate, coverage image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from calibration.boards import BoardDetector, BoardSpec
from policy_runtime.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_VIEWS = 4  # fewer views than this cannot separate focal length from board distance (OpenCV's sample agrees)
COVERAGE_GRID = (8, 6)  # cells across x down the image used to measure how much of it the corners covered


@dataclass
class IntrinsicsResult:
    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray
    rms: float
    per_view: dict[str, float]  # image file name -> RMS reprojection error of that view (px)
    coverage: float  # fraction of COVERAGE_GRID cells holding at least one detected corner
    skipped: dict[str, str] = field(default_factory=dict)  # image -> why it was not used
    all_corners: list[np.ndarray] = field(default_factory=list)


def list_images(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.exists():
        raise UserError(f"image directory {d} does not exist")
    if not d.is_dir():
        raise UserError(f"--images {d} is a file, not a directory of images")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    return files


def read_image(path: str | Path) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise UserError(f"image {p} does not exist")
    if not p.is_file():
        raise UserError(f"image {p} is not a file")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"image {p} is unreadable or not an image format OpenCV reads (png, jpg, bmp, tif)")
    return img


def calibrate_intrinsics(images: list[Path], spec: BoardSpec) -> IntrinsicsResult:
    """Calibrate from the usable views; refuses images of mixed sizes and too few usable views."""
    detector = BoardDetector(spec)
    obj_pts, img_pts, names, skipped, loaded = [], [], [], {}, []
    size = None
    for path in images:
        img = read_image(path)
        loaded.append(img)
        if size is None:
            size = (img.shape[1], img.shape[0])
        elif (img.shape[1], img.shape[0]) != size:
            raise UserError(f"{path.name} is {img.shape[1]}x{img.shape[0]} but earlier images are {size[0]}x{size[1]}; "
                            "calibrate one resolution at a time")
        det = detector.detect(img)
        if not detector.usable(det):
            skipped[path.name] = f"{len(det.ids)} ChArUco corners ({det.n_markers} markers)"
            continue
        obj, im = det.object_image_points(detector.board)
        obj_pts.append(obj)
        img_pts.append(im)
        names.append(path.name)
    if not names:
        raise UserError(f"no usable board in {len(images)} images: {detector.diagnose(loaded[:5])}")
    if len(names) < MIN_VIEWS:
        raise UserError(f"only {len(names)} of {len(images)} images show a usable board; need at least {MIN_VIEWS} "
                        "views (more, tilted and spread over the image, give better intrinsics)")
    rms, K, dist, _, _, _, _, per_view = cv2.calibrateCameraExtended(obj_pts, img_pts, size, None, None)
    return IntrinsicsResult(size[0], size[1], K, dist.reshape(-1), float(rms),
                            dict(zip(names, (float(e) for e in per_view.reshape(-1)), strict=True)),
                            corner_coverage(img_pts, size), skipped, img_pts)


def check_rms_gate(result: IntrinsicsResult, max_rms: float) -> None:
    """Refuse a calibration whose RMS reprojection error is above the gate, naming the worst views."""
    if not (np.isfinite(result.rms) and np.all(np.isfinite(result.K)) and np.all(np.isfinite(result.dist))
            and result.K[0, 0] > 0 and result.K[1, 1] > 0):
        raise UserError(f"the calibration diverged (RMS {result.rms}, fx {result.K[0, 0]}, fy {result.K[1, 1]}); "
                        "add views with the board tilted and spread over the image")
    if result.rms > max_rms:
        worst = sorted(result.per_view.items(), key=lambda kv: -kv[1])[:3]
        raise UserError(f"RMS reprojection error {result.rms:.3f} px is above the gate of {max_rms} px (--max-rms); "
                        "worst views: " + ", ".join(f"{n} {e:.2f} px" for n, e in worst)
                        + " (remove blurred views, check the board is flat and its sizes are right)")


def corner_coverage(img_pts: list[np.ndarray], size: tuple[int, int]) -> float:
    gx, gy = COVERAGE_GRID
    pts = np.concatenate(img_pts)
    cells = {(int(x * gx / size[0]), int(y * gy / size[1])) for x, y in pts}
    return len(cells) / (gx * gy)


def coverage_image(result: IntrinsicsResult, background: np.ndarray | None = None) -> np.ndarray:
    """Every detected corner drawn on the (dimmed) first image, with the coverage grid: gaps show where to aim."""
    h, w = result.height, result.width
    canvas = np.zeros((h, w, 3), np.uint8) if background is None else (background // 3).astype(np.uint8)
    gx, gy = COVERAGE_GRID
    for i in range(1, gx):
        cv2.line(canvas, (i * w // gx, 0), (i * w // gx, h - 1), (80, 80, 80), 1)
    for j in range(1, gy):
        cv2.line(canvas, (0, j * h // gy), (w - 1, j * h // gy), (80, 80, 80), 1)
    n = max(len(result.all_corners), 1)
    for k, pts in enumerate(result.all_corners):
        hue = int(150 * k / n)
        color = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2BGR)[0, 0].tolist()
        for x, y in pts:
            cv2.circle(canvas, (int(round(x)), int(round(y))), 3, color, -1, cv2.LINE_AA)
    cv2.putText(canvas, f"RMS {result.rms:.3f} px  views {len(result.per_view)}  coverage {result.coverage:.0%}",
                (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
