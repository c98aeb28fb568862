"""``slsr train``: CE pretraining (``--strategy none``) or the final training with generated images
(``--strategy slsr|lsro|all_in_one|pseudo``) on Ray Train, then rank-1/mAP on query/gallery."""

from __future__ import annotations

import json

import typer

from ..errors import check_option


def train(
    dataset: str = typer.Option(..., "--dataset", "-d", help="market1501, dukemtmcreid, msmt17, cuhk03, viper, folder, synthetic"),
    root: str = typer.Option(..., "--root", "-r", help="dataset root folder"),
    output: str = typer.Option(..., "--output", "-o", help="output folder or s3:// prefix (checkpoints, metrics)"),
    strategy: str = typer.Option("none", help="none, lsr, lsro, all_in_one, pseudo, slsr"),
    generated: str | None = typer.Option(None, help="generated-images manifest (parquet; pid -1, cluster c)"),
    clusters: str | None = typer.Option(None, help="cluster membership JSON from the clustering stage (slsr)"),
    workers: int = typer.Option(1, help="Ray Train workers (DDP)"),
    epochs: int = typer.Option(130),
    batch_size: int = typer.Option(32, help="global batch size, split over the workers"),
    lr: float = typer.Option(0.01),
    lr_policy: str = typer.Option("inv", help="inv (paper), step, cosine"),
    lam: float = typer.Option(1.0, help="lambda of generated images"),
    epsilon: float = typer.Option(0.1, help="label smoothing of real images under lsr"),
    generated_ratio: float | None = typer.Option(None, help="generated images per real image per epoch (default: all)"),
    backbone: str = typer.Option("resnet50", help="resnet50 or resnet18"),
    pretrained: str | None = typer.Option(None, help="ImageNet state dict (path or s3:// URI)"),
    init: str | None = typer.Option(None, help="start from a slsr checkpoint (e.g. the pretraining model.pt)"),
    noise_layer: bool = typer.Option(True, help="use the noise adaptation layer on top of the softmax"),
    noise_layer_on: str = typer.Option("generated", help="score 'generated' images or 'all' through it"),
    height: int = typer.Option(256),
    width: int = typer.Option(128),
    crop: str = typer.Option("pad", help="pad (re-id baseline) or resize (paper: 8/7 resize + random crop)"),
    erasing_p: float = typer.Option(0.5, help="random erasing probability"),
    gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="default: GPUs when the Ray cluster has them"),
    loader_workers: int = typer.Option(2, help="DataLoader processes per Ray Train worker"),
    max_failures: int = typer.Option(0, help="worker-group restarts from the last checkpoint"),
    seed: int = typer.Option(0),
    evaluate: bool = typer.Option(True, help="report rank-1/mAP on query/gallery after training"),
    feature: str = typer.Option("pool", help="retrieval feature for evaluation: pool or bottleneck"),
) -> None:
    """Train the re-id model with Ray Train and print per-epoch metrics and the evaluation."""
    # Long because most of it is the typer option list, one line per TrainConfig field.
    from ..data import load_dataset
    from ..errors import as_config_error
    from ..models import ModelConfig
    from ..train import TrainConfig, evaluate_checkpoint, run_training
    from ..validate import check_backbone_weights, check_folder, check_model_checkpoint

    if strategy == "slsr" and (not generated or not clusters):
        raise typer.BadParameter("--strategy slsr needs --generated MANIFEST and --clusters MEMBERSHIP_JSON")
    with as_config_error("train options"):
        cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, lr_policy=lr_policy, lam=lam, epsilon=epsilon,
            strategy=strategy, generated_ratio=generated_ratio, num_workers=workers, use_gpu=gpu,
            height=height, width=width, crop=crop, erasing_p=erasing_p, noise_layer_on=noise_layer_on,
            loader_workers=loader_workers, max_failures=max_failures, seed=seed,
            model=ModelConfig(backbone=backbone, pretrained=pretrained, noise_layer=noise_layer),
        )  # fmt: skip
    check_option(0 <= lam <= 1, "--lam", "a number in [0, 1]", lam)
    check_option(0 <= erasing_p <= 1, "--erasing-p", "a probability in [0, 1]", erasing_p)
    # OUTPUT holds resumable Ray Train checkpoints: every input is checked before Ray starts
    check_folder(output, "--output", must_exist=False)
    if pretrained:
        check_backbone_weights(pretrained, backbone, "--pretrained")
    if init:
        check_model_checkpoint(init, "--init")
    ds = load_dataset(dataset, root)
    with as_config_error("train inputs"):  # run_training checks the manifests on the driver (ValueError)
        result = run_training(
            cfg, ds.train, output, generated_manifest=generated, membership=clusters, init_checkpoint=init
        )
    for m in result.metrics:
        typer.echo(
            f"epoch {m['epoch'] + 1:>4}  loss {m['loss']:.4f}  train-acc {m['train_acc']:.3f}  "
            f"lr {m['lr']:.5f}  {m['images_per_s']:.1f} img/s"
        )
    typer.echo(f"model: {result.checkpoint}  ({result.wall_s:.1f} s, {result.resumes} resume(s))")
    if evaluate and ds.query.num_rows and ds.gallery.num_rows:
        scores = evaluate_checkpoint(result.checkpoint, ds.query, ds.gallery, feature=feature)
        scores.pop("cmc")
        typer.echo(json.dumps(scores, indent=2))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
