"""Camera intrinsics (ChArUco), hand-eye calibration, and conversion of a calibrated camera into ManiSkill."""
