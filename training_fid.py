"""FID inside training: train.py scores its periodic sample dumps (evals/{step}.npz) with the evaluator's PyTorch
Inception backend, in the training processes, and appends the evaluator's line to evals/eval_results.txt through
the evaluator's own results writer, holding the evaluator's lock on that file (evaluator.append_result and
evaluator.results_claim): a standalone evaluator of evals/ and the run never write it at the same time. With
fid_dinov2 the line has FD-DINOv2 too (dinov2_features.py): each rank computes the DINOv2 features of its share
beside the Inception ones, written to the same per-rank files.
"""
import dataclasses
import os

import numpy as np
import torch.distributed as dist

import evaluator
from dinov2_features import Moments
from distributed import RowShare, barrier, broadcast_object, first_error
from safe_io import OutputError, atomic_write


class TrainingFID:
    """Scores the periodic dumps in the training processes with the evaluator's PyTorch Inception backend:
    each rank computes the features of its share as it is sampled and writes them next to the dump; every rank
    reads them all and computes its rows of the precision/recall work (evaluator.compute_metrics with a
    RowShare); rank 0 computes IS, FID and sFID and appends the evaluator's line to evals/eval_results.txt (the
    caller logs it). The reference batch is checked, and its statistics and radii computed (or read from the
    evaluator's cache), before step 1. A failed write of any rank (features or the results line, any exception
    type) raises OutputError on every rank, naming the path and the free space. With cfg.fid_dinov2, FD-DINOv2
    against the DINOv2 statistics of the reference batch's images (rank 0). `scores` holds rank 0's metrics of
    the last dump (None elsewhere)."""

    def __init__(self, cfg, device, rank, eval_dir):
        self.rank, self.eval_dir = rank, eval_dir
        # Every rank checks (a file lookup): a missing DINOv2 file stops all of them before step 1.
        dinov2_weights = (evaluator.check_dinov2_inputs(cfg.fid_ref_batch, cfg.fid_dinov2_weights)
                          if cfg.fid_dinov2 else None)
        if rank == 0:  # a download, if any, happens once
            evaluator.check_batch(cfg.fid_ref_batch, role="reference batch")
            evaluator.resolve_inception_graph(cfg.fid_inception_graph)
        barrier()
        graph = evaluator.resolve_inception_graph(cfg.fid_inception_graph)
        # The TensorFlow self-check of the first batch runs on rank 0 when TensorFlow is importable.
        self.features = evaluator.make_feature_extractor("torch", graph, device=device, tf_check=rank == 0)
        self.reference = evaluator.load_reference(cfg.fid_ref_batch, self.features) if rank == 0 else None
        # The precision/recall rows are split over the ranks, which all need the reference pool features (and
        # their radii, computed here the same way unless the evaluator's cache holds them).
        self.device = device
        self.share = RowShare() if dist.is_initialized() else None
        if self.share is not None:
            received = broadcast_object(dataclasses.replace(self.reference, spatial=None) if rank == 0 else None)
            self.reference = self.reference if rank == 0 else received
        self.reference.radii(device=device, share=self.share)
        self.dinov2 = evaluator.make_dinov2_features(dinov2_weights, device) if cfg.fid_dinov2 else None
        self.dinov2_reference = (evaluator.load_dinov2_reference(self.dinov2, cfg.fid_ref_batch)
                                 if self.dinov2 is not None and rank == 0 else None)
        self.parts = self.scores = None

    def start(self):
        self.parts = ([], [], []) + (([],) if self.dinov2 is not None else ())

    def add(self, images):
        for out, value in zip(self.parts, self.features.features_of(images)):
            out.append(value)
        if self.dinov2 is not None:
            self.parts[3].append(self.dinov2.features_of(images))

    def finish(self, name, world_size):
        """The line of `name` (rank 0; None elsewhere), appended to eval_results.txt."""
        stem = os.path.join(self.eval_dir, f".{name}.features")
        self._write_features(f"{stem}{self.rank}.npz")
        loaded = [np.load(f"{stem}{r}.npz") for r in range(world_size)]
        pool, spatial, probs, *dinov2 = (np.concatenate([f[f"arr_{i}"] for f in loaded if f[f"arr_{i}"].size])
                                         for i in range(len(self.parts)))
        # Every rank takes part (its rows of the precision/recall work); rank 0 gets the result.
        result = evaluator.compute_metrics(self.reference, pool, spatial, probs, device=self.device,
                                           share=self.share)
        line = error = None
        if self.rank == 0:
            if dinov2:
                result[evaluator.FD_DINOV2] = evaluator.fd_dinov2(self.dinov2_reference, Moments().add(dinov2[0]))
            self.scores = result
            line = evaluator.format_result({"file": name, **result})
            try:
                self._append(line)
            except Exception as e:  # noqa: BLE001 (any type, reported on every rank below)
                error = str(e) if isinstance(e, OutputError) else f"{type(e).__name__}: {e}"
            for r in range(world_size):
                os.remove(f"{stem}{r}.npz")
        error = first_error(error)  # also the barrier before the next dump
        if error:
            raise OutputError(f"FID of {name} not recorded: {error}")
        return line

    def _write_features(self, path):
        """This rank's features of the dump, then a collective: every rank's are on disk, or every rank stops."""
        arrays = (np.concatenate(p) if p else np.zeros((0, 0), np.float32) for p in self.parts)
        error = None
        try:
            atomic_write(path, lambda tmp: _savez(tmp, arrays), "Inception features")
        except OutputError as e:
            error = f"rank {self.rank}: {e}"
        error = first_error(error)
        if error:
            raise OutputError(f"FID not computed: {error}")

    def _append(self, line):
        path = os.path.join(self.eval_dir, evaluator.RESULTS_FILENAME)
        with evaluator.results_claim(path):
            evaluator.append_result(path, line)


def _savez(path, arrays):
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a name without it
        np.savez(f, *arrays)
