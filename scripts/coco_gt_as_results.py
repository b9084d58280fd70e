"""Turn a COCO ground-truth file into a COCO results file (every annotation as a detection, score 1.0).

A sanity check of the evaluation path: evaluating the output against its own ground truth must give AP 1.0.

    uv run python scripts/coco_gt_as_results.py GT.json RESULTS.json
"""

from __future__ import annotations

import argparse
import json

from pycocotools.coco import COCO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gt", help="COCO ground-truth JSON")
    parser.add_argument("out", help="results JSON to write")
    args = parser.parse_args()
    coco = COCO(args.gt)
    results = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue  # crowd regions are ignored by COCOeval, never detections
        rle = coco.annToRLE(ann)
        counts = rle["counts"]  # bytes when pycocotools encoded it, str when the file held compressed RLE
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": {"size": rle["size"], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            }
        )
    with open(args.out, "w") as fh:
        json.dump(results, fh)
    print(f"wrote {len(results)} detections to {args.out}")


if __name__ == "__main__":
    main()
