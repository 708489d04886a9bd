"""ChArUco boards: description, detection, pose estimation and diagnosis of failed detections.

Uses the OpenCV >= 4.7 objdetect API (CharucoBoard + CharucoDetector + matchImagePoints). A failed
detection is diagnosed (wrong dictionary, legacy layout) because OpenCV itself reports no error: a board
with the wrong layout yields markers but zero ChArUco corners.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from calibration.checks import number
from calibration.transforms import make_T
from policy_runtime.errors import UserError

# Ordered by OpenCV's enum value, so within a family the smallest dictionary comes first.
DICTIONARIES = tuple(sorted((n for n in dir(cv2.aruco) if n.startswith("DICT_")), key=lambda n: getattr(cv2.aruco, n)))
MIN_CORNERS = 6  # fewer corners than this give an unstable pose and add little to a calibration


@dataclass(frozen=True)
class BoardSpec:
    """A printed ChArUco board; squares are counted as columns x rows, lengths are in metres."""

    columns: int
    rows: int
    square_m: float
    marker_m: float
    dictionary: str = "DICT_5X5_100"
    legacy_pattern: bool = False

    def to_dict(self) -> dict:
        return {"type": "charuco", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> BoardSpec:
        """Reads the board block of samples.json (lengths in mm there, as printed on the board)."""
        if d.get("type", "charuco") != "charuco":
            raise UserError(f"board type {d['type']!r} is not supported; only 'charuco' boards are")
        for key in ("squares", "square_mm", "marker_mm"):
            if key not in d:
                raise UserError(f"board description lacks '{key}' (squares '7x5', square_mm, marker_mm, dictionary)")
        sq = d["squares"]
        if not (isinstance(sq, str) or (isinstance(sq, list) and all(isinstance(v, int) for v in sq))):
            raise UserError(f"board squares must be 'COLUMNSxROWS' or [columns, rows], got {sq!r}")
        cols, rows = parse_squares("x".join(map(str, sq)) if isinstance(sq, list) else sq)
        square = number(d["square_mm"], "board square_mm", low=0, high=2000, low_open=True)
        marker = number(d["marker_mm"], "board marker_mm", low=0, high=2000, low_open=True)
        dictionary, legacy = d.get("dictionary", "DICT_5X5_100"), d.get("legacy_pattern", False)
        if not isinstance(dictionary, str) or not isinstance(legacy, bool):
            raise UserError("board dictionary must be a name such as 'DICT_5X5_100' and legacy_pattern true or false")
        return cls(cols, rows, square / 1000.0, marker / 1000.0, dictionary, legacy)


def parse_squares(text: str) -> tuple[int, int]:
    """'7x5' -> (7, 5): columns x rows."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"squares must be COLUMNSxROWS, e.g. 7x5, got {text!r}") from None
    if cols < 3 or rows < 3:
        raise UserError(f"a ChArUco board needs at least 3x3 squares, got {text}")
    return cols, rows


def make_board(spec: BoardSpec) -> cv2.aruco.CharucoBoard:
    if spec.dictionary not in DICTIONARIES:
        raise UserError(f"unknown ArUco dictionary {spec.dictionary!r}; e.g. DICT_5X5_100, DICT_4X4_50, DICT_6X6_250")
    if not 0 < spec.marker_m < spec.square_m:
        raise UserError(f"the marker ({spec.marker_m * 1000:g} mm) must be smaller than the square "
                        f"({spec.square_m * 1000:g} mm)")
    dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, spec.dictionary))
    n_markers = spec.columns * spec.rows // 2
    if n_markers > dictionary.bytesList.shape[0]:
        raise UserError(f"a {spec.columns}x{spec.rows} board has {n_markers} markers, more than "
                        f"{spec.dictionary} holds ({dictionary.bytesList.shape[0]})")
    board = cv2.aruco.CharucoBoard((spec.columns, spec.rows), spec.square_m, spec.marker_m, dictionary)
    board.setLegacyPattern(spec.legacy_pattern)
    return board


def board_image(spec: BoardSpec, px_per_square: int = 100, margin_px: int = 0) -> np.ndarray:
    """The board as a grayscale image, for printing or for texturing a simulated board."""
    size = (spec.columns * px_per_square + 2 * margin_px, spec.rows * px_per_square + 2 * margin_px)
    return make_board(spec).generateImage(size, marginSize=margin_px)


@dataclass
class Detection:
    corners: np.ndarray  # [N, 2] float32 image points of ChArUco corners
    ids: np.ndarray  # [N] int corner ids
    n_markers: int  # ArUco markers seen (before corner interpolation)

    def object_image_points(self, board: cv2.aruco.CharucoBoard) -> tuple[np.ndarray, np.ndarray]:
        obj, img = board.matchImagePoints(self.corners.reshape(-1, 1, 2), self.ids.reshape(-1, 1))
        return obj.reshape(-1, 3).astype(np.float32), img.reshape(-1, 2).astype(np.float32)


class BoardDetector:
    def __init__(self, spec: BoardSpec):
        self.spec = spec
        self.board = make_board(spec)
        self._detector = cv2.aruco.CharucoDetector(self.board)

    def detect(self, image: np.ndarray) -> Detection:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        corners, ids, _, marker_ids = self._detector.detectBoard(gray)
        n_markers = 0 if marker_ids is None else len(marker_ids)
        if ids is None or len(ids) == 0:
            return Detection(np.zeros((0, 2), np.float32), np.zeros(0, int), n_markers)
        return Detection(corners.reshape(-1, 2), ids.reshape(-1).astype(int), n_markers)

    def usable(self, det: Detection) -> bool:
        """Enough corners, spread over at least two rows and two columns (collinear points fix no pose)."""
        if len(det.ids) < MIN_CORNERS:
            return False
        inner_cols = self.spec.columns - 1
        return len(set(det.ids % inner_cols)) >= 2 and len(set(det.ids // inner_cols)) >= 2

    def diagnose(self, images: list[np.ndarray]) -> str:
        """Why no usable board was found, with the option that would fix it when we can tell."""
        dets = [self.detect(im) for im in images]
        if any(d.n_markers for d in dets):
            flipped = BoardDetector(BoardSpec(**{**asdict(self.spec), "legacy_pattern": not self.spec.legacy_pattern}))
            if sum(len(flipped.detect(im).ids) for im in images) > sum(len(d.ids) for d in dets):
                fix = "remove --legacy-pattern" if self.spec.legacy_pattern else "add --legacy-pattern"
                return (f"{self.spec.dictionary} markers were found but few or no ChArUco corners; the board uses the "
                        f"{'new' if self.spec.legacy_pattern else 'legacy (pre-OpenCV 4.6)'} layout: {fix}")
            return (f"{self.spec.dictionary} markers were found but no usable ChArUco corners; check --squares "
                    f"(columns x rows, here {self.spec.columns}x{self.spec.rows}) and the square/marker sizes")
        found = _best_other_dictionary(images[:3])
        if found:
            return f"no {self.spec.dictionary} markers found, but {found} markers were: use --dict {found}"
        return "no ArUco markers found in any image (is the board in view, in focus and lit?)"


def _best_other_dictionary(images: list[np.ndarray]) -> str | None:
    """The predefined dictionary that decodes the most markers in these images (smallest one on ties)."""
    best, best_count = None, 0
    for name in DICTIONARIES:
        det = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, name)))
        count = 0
        for im in images:
            _, ids, _ = det.detectMarkers(im if im.ndim == 2 else cv2.cvtColor(im, cv2.COLOR_BGR2GRAY))
            count += 0 if ids is None else len(ids)
        if count > best_count:
            best, best_count = name, count
    return best if best_count >= 2 else None


def estimate_board_pose(detector: BoardDetector, det: Detection, K: np.ndarray, dist: np.ndarray
                        ) -> tuple[np.ndarray, float]:
    """cam_T_board (OpenCV camera axes, metres) and the RMS reprojection error in pixels."""
    obj, img = det.object_image_points(detector.board)
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, dist, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        raise UserError("solvePnP failed on a board detection")
    rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, dist, rvec, tvec)
    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, dist)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - img) ** 2, axis=1))))
    return make_T(cv2.Rodrigues(rvec)[0], tvec), rms
