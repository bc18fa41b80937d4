"""What TensorBoard shows of a run, rendered to one PNG from the run's event files (TensorBoard's own
reader): chosen scalar curves and the latest sample grid, for the README where no browser is.

    .venv/bin/python docs/render_tensorboard.py runs/dcgan_sample64 --tags loss_d loss_g d_real d_fake \
        --out docs/images/tensorboard_dcgan.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--tags", nargs="+", required=True, help="scalar tags to plot")
    parser.add_argument("--image", default="samples/grid", help="image tag: its latest image is shown")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    events = EventAccumulator(str(Path(args.run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 1})
    events.Reload()
    figure, axes = plt.subplots(1, len(args.tags) + 1, figsize=(3.2 * (len(args.tags) + 1), 3.2))
    for axis, tag in zip(axes, args.tags):
        curve = events.Scalars(tag)
        axis.plot([event.step for event in curve], [event.value for event in curve])
        axis.set_title(tag)
        axis.set_xlabel("step")
    latest = events.Images(args.image)[-1]
    axes[-1].imshow(Image.open(io.BytesIO(latest.encoded_image_string)))
    axes[-1].set_title(f"{args.image}, step {latest.step}")
    axes[-1].axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
