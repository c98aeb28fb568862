"""Step 5 of Algorithm 1: images from each cluster's DCGAN, tagged with their cluster (the training stage
gives them the cluster's sparse label).

Artifacts under the generation ``out_dir`` (a local path or ``s3://`` URI)::

    out_dir/images/c{c}/000000-001024.tar ...   generated images, resized to the re-id shape (h, w), as
                                         JPEGs in tar shards of ``shard_size`` (one object per shard,
                                         so few PUTs on S3); the manifest path of image i is
                                         ``<shard>#<i:06d>.jpg`` (``data.read_image`` reads it)
    out_dir/manifest.parquet             MANIFEST_SCHEMA rows (pid -1, camid -1, source "generated",
                                         cluster c) plus ``generator`` (the checkpoint URI)
    out_dir/generation.json              seed, sizes and checkpoint digests (guards resumption)

Image i of cluster c depends only on (seed, c, i) and the checkpoint: the same seed gives the same
images, and a smaller count gives a prefix of a larger one (the sweep relies on it).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from . import layout, storage
from .data import MANIFEST_SCHEMA
from .gan import GanCheckpointError, GanError, checkpoint_uri, generation_noise, load_checkpoint
from .models.dcgan import DCGANArch, build_dcgan

SPLITS = ("proportional", "equal")
GENERATED_SCHEMA = MANIFEST_SCHEMA.append(pa.field("generator", pa.string()))


def split_count(count: int, sizes: dict[int, int], split: str = "proportional") -> dict[int, int]:
    """Share ``count`` images among clusters, proportional to ``sizes`` or equally.

    Uses the Sainte-Lague/Webster divisor method: as close to proportional as whole numbers allow,
    and house-monotone (no cluster gets fewer images when the total grows), which keeps the images
    of a smaller count a prefix of those of a larger one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count <= 0:
        raise ValueError(f"the number of images to generate must be positive, got {count}")
    weights = {c: (float(s) if split == "proportional" else 1.0) for c, s in sorted(sizes.items())}
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"cannot split {count} images over clusters of sizes {sizes}")
    seats = dict.fromkeys(weights, 0)
    heap = [(-w, c) for c, w in weights.items() if w > 0]
    heapq.heapify(heap)
    for _ in range(count):
        _, c = heapq.heappop(heap)
        seats[c] += 1
        heapq.heappush(heap, (-weights[c] / (2 * seats[c] + 1), c))
    return seats


def find_checkpoints(gan_dir: str) -> dict[int, str]:
    """Cluster id -> checkpoint URI for every ``c{c}/ckpt.pt`` under ``gan_dir``."""
    found = {}
    for c in layout.gan_clusters(gan_dir):
        if storage.exists(checkpoint_uri(gan_dir, c)):
            found[c] = checkpoint_uri(gan_dir, c)
    if not found:
        raise GanCheckpointError(f"no DCGAN checkpoints (c{{c}}/ckpt.pt) under {gan_dir}; run `slsr gan train` first")
    return dict(sorted(found.items()))


def _generate_cluster(
    ckpt_uri: str, cluster: int, count: int, out_dir: str, seed: int, image_size: tuple[int, int],
    batch_size: int, quality: int, shard_size: int = 1024,
) -> list[str]:
    """Write images 0..count-1 of one cluster as tar shards of ``shard_size`` JPEGs (one object each where
    one file per image made 12,000 small S3 PUTs for Market, and as many GETs per training epoch),
    skipping shards already there; returns the images' manifest paths (``<shard>#NNNNNN.jpg``)."""
    import tarfile

    from .gpu import device_for, gpu_assigned

    device = device_for(gpu_assigned(), "generation task")
    ckpt = load_checkpoint(ckpt_uri, device)
    arch = DCGANArch(**ckpt["arch"])
    G, _ = build_dcgan(arch)
    G.load_state_dict(ckpt["G"])
    G.to(device).eval()  # eval: BatchNorm running stats, so an image does not depend on its batch mates
    img_dir = layout.generated_images_dir(out_dir, cluster)
    existing = set(storage.listdir(img_dir))
    h, w = image_size
    shard_size = max(1, -(-shard_size // batch_size)) * batch_size  # whole, aligned batches per shard

    def encode(arr: np.ndarray) -> bytes:
        img = Image.fromarray(arr)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    paths, wanted = [], set()
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, count, shard_size):
            stop = min(start + shard_size, count)
            shard = layout.generated_shard(out_dir, cluster, start, stop)
            names = [f"{i:06d}.jpg" for i in range(start, stop)]
            paths += [layout.shard_member(shard, n) for n in names]
            wanted.add(os.path.basename(shard))
            if os.path.basename(shard) in existing:
                continue
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for b0 in range(start, stop, batch_size):
                    # Always full, aligned batches: image i is then computed bit-identically whatever `count` is.
                    z = generation_noise(seed, cluster, range(b0, b0 + batch_size), arch.nz).to(device)
                    with torch.no_grad():
                        imgs = G(z).add_(1).mul_(127.5).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
                    for i, data in zip(range(b0, min(b0 + batch_size, stop)), pool.map(encode, imgs[: stop - b0]),
                                       strict=True):
                        info = tarfile.TarInfo(names[i - start])  # mtime 0, no owner: the same bytes every run
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))
            storage.write_bytes(shard, buf.getvalue())
    for stale in existing - wanted:  # shards of another count (their last shard differs) or single images
        storage.remove(storage.join(img_dir, stale))
    return paths


_generate_cluster_task = ray.remote(_generate_cluster)


def _checkpoint_meta(uri: str) -> dict:
    """What generation needs from a checkpoint without building the model: size, epoch, content digest."""
    data = storage.read_bytes(uri)
    ckpt = load_checkpoint(uri, data=data)
    return {"num_images": int(ckpt["num_images"]), "epoch": int(ckpt["epoch"]),
            "sha256": hashlib.sha256(data).hexdigest()[:16]}


def generate_images(
    gan_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    count: int,
    split: str = "proportional",
    seed: int = 0,
    image_size: tuple[int, int] = (128, 64),
    batch_size: int = 64,
    quality: int = 95,
    shard_size: int = 1024,
    use_ray: bool | None = None,
    progress: bool = True,
) -> str:
    """Generate ``count`` images from the per-cluster DCGANs under ``gan_dir``; returns the manifest URI.

    The count is split across clusters proportionally to their training-set size (``"equal"``: the
    same number each). Image i of cluster c depends only on (seed, c, i) and the checkpoint, so the
    same seed gives the same images and a smaller count gives a prefix of a larger one. Images are
    written ``shard_size`` to a tar shard per cluster (one object per shard); shards already in
    ``out_dir`` are skipped (resumable); ``out_dir`` refuses images from other checkpoints or seeds.
    ``image_size`` is the (height, width) of the files: the square GAN output is resized to the re-id
    shape. With ``use_ray`` (default: when Ray is initialised) clusters are generated as parallel Ray
    tasks, on a GPU each when the cluster has them.
    """
    from tqdm.auto import tqdm

    if not isinstance(count, (int, np.integer)) or count <= 0:
        raise ValueError(f"count (images to generate) must be a positive integer, got {count!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    h, w = (int(image_size[0]), int(image_size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be (height, width) > 0, got {image_size}")
    gan_dir, out_dir = storage.absolute(gan_dir), storage.absolute(out_dir)
    ckpts = find_checkpoints(gan_dir)
    meta = {c: _checkpoint_meta(u) for c, u in ckpts.items()}
    counts = split_count(int(count), {c: m["num_images"] for c, m in meta.items()}, split)
    identity = {
        "seed": int(seed),
        "batch_size": int(batch_size),
        "image_size": [h, w],
        "quality": int(quality),
        "shard_size": int(shard_size),
        "checkpoints": {
            str(c): {"uri": u, "sha256": meta[c]["sha256"], "epoch": meta[c]["epoch"]} for c, u in ckpts.items()
        },
    }
    _claim_output(out_dir, identity, counts)
    jobs = {c: (ckpts[c], c, n, out_dir, int(seed), (h, w), int(batch_size), int(quality), int(shard_size))
            for c, n in counts.items() if n}
    paths = _run_jobs(jobs, ray.is_initialized() if use_ray is None else use_ray,
                      tqdm(total=len(jobs), desc=f"generating {count} images", unit="cluster", disable=not progress))
    manifest = layout.generated_manifest(out_dir)
    storage.write_table(manifest, _manifest_table(paths, ckpts))
    return manifest


def _claim_output(out_dir: str, identity: dict, counts: dict[int, int]) -> None:
    """Guard resumption: images already in ``out_dir`` must come from the same checkpoints and settings."""
    gen_json = storage.join(out_dir, layout.GENERATION_INFO)
    if storage.exists(gen_json):
        previous = storage.read_json(gen_json)
        previous.pop("counts", None)
        if previous != identity:
            raise GanError(
                f"{out_dir} already holds images from other checkpoints or settings ({gen_json}); "
                "use a new output folder, or remove it to regenerate"
            )
    storage.write_json(gen_json, {**identity, "counts": {str(c): n for c, n in counts.items()}})


def _run_jobs(jobs: dict[int, tuple], use_ray: bool, bar) -> dict[int, list[str]]:
    """Each cluster's images: parallel Ray tasks (a GPU each where the cluster has them), or in-process."""
    paths: dict[int, list[str]] = {}
    if use_ray:
        from . import gpu

        nodes = gpu.gpu_nodes()  # one GPU per cluster's task where there are GPUs, with a CPU beside it
        num_gpus = gpu.share(1, nodes)
        num_cpus = max(0.01, gpu.cpus_beside(1, num_gpus, 1.0, nodes)) if num_gpus else 1.0
        task = _generate_cluster_task.options(num_gpus=num_gpus, num_cpus=num_cpus)
        refs = {task.remote(*args): c for c, args in jobs.items()}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            paths[refs[done[0]]] = ray.get(done[0])
            bar.update()
    else:
        for c, args in jobs.items():
            paths[c] = _generate_cluster(*args)
            bar.update()
    bar.close()
    return paths


def _manifest_table(paths: dict[int, list[str]], ckpts: dict[int, str]) -> pa.Table:
    """The generated-images manifest: pid/camid -1, source "generated", the cluster and its generator."""
    rows_path, rows_cluster, rows_gen = [], [], []
    for c in sorted(paths):
        rows_path += paths[c]
        rows_cluster += [c] * len(paths[c])
        rows_gen += [ckpts[c]] * len(paths[c])
    n = len(rows_path)
    return pa.table(
        {
            "path": pa.array(rows_path, pa.string()),
            "pid": pa.array(np.full(n, -1, np.int64)),
            "camid": pa.array(np.full(n, -1, np.int64)),
            "source": pa.array(["generated"] * n, pa.string()),
            "cluster": pa.array(rows_cluster, pa.int64()),
            "generator": pa.array(rows_gen, pa.string()),
        },
        schema=GENERATED_SCHEMA,
    )
