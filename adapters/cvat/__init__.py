"""CVAT adapter: the same backends inside CVAT.

Two ways in, one set of conversions (`convert`):

- cvat-sdk auto-annotation functions, the path CVAT maintains: `detector` (a YOLO model's boxes,
  rotated boxes, masks or polygons, skeletons and tags, with our uncertainty as an attribute) and
  `interactor` (points and an optional box in, a mask out). Use them with
  `cvat-cli task auto-annotate --function-module labelassist.adapters.cvat.detector ...` or, on CVAT
  editions with agents, `cvat-cli function create-native` / `run-agent`.
- nuclio functions for self-hosted CVAT's AI tools (`nuclio/<name>/function.yaml` and `main.py`),
  whose handlers live in `serverless`.

Nothing here runs a model: it turns CVAT's inputs into numpy images and `Prompt`s, calls the backends,
and turns `Region`s back into CVAT shapes.
"""
