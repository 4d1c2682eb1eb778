"""transformers' ``Trainer`` under sequence parallelism: a data-loader adapter and a thin subclass.

Under SP the ranks of one SP group hold parts of the *same* sequences. The Trainer's loader
(accelerate's) gives every process its own batch, so a plain Trainer -- even with a loss that
reads sharded labels -- would feed one SP group several different batches (``dtf.shard_batch``
notices the different ``input_ids`` and raises). Two pieces fix that:

- ``SPDataLoaderAdapter(dataloader, mesh, layout)``: per batch of the wrapped loader, gathers
  the batches of every rank of the SP group and yields them one after another, each sharded
  for this rank by ``dtf.shard_batch``. Every rank of a group trains on the same sequences at
  every step, and every batch the loader hands out is trained on once (the loader yields
  ``mesh.size`` times as many batches; a step's global batch is one batch per SP group).
- ``SPTrainer(..., mesh=mesh)``: a ``transformers.Trainer`` whose training loader is that
  adapter and whose loss is the token-mean next-token cross entropy over the *global* batch of
  the step (every SP group, every accumulated micro-batch), as ``Trainer`` computes it with
  ``average_tokens_across_devices=True``. Each rank's loss is its own tokens' sum over the
  global count, times the number of processes; DDP (which the Trainer wraps the model in, over
  every process) averages gradients over the processes, so the gradient is the one-process
  gradient of the global batch, and the logged loss (the Trainer's mean over processes) the
  one-process loss. SP ranks are counted once: their tokens are disjoint.

    mesh = distattn.SPMesh.from_device_mesh(device_mesh, sp_dim="sp")
    dtf.register(mesh, layout="zigzag")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="distattn")
    trainer = SPTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                        mesh=mesh)
    trainer.train()
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..mesh import as_mesh
from . import hf
from . import registry as _registry
from .transformers import _REACHED, IGNORE_INDEX, shard_batch

hf.require()
from transformers import Trainer  # noqa: E402  (after the version check)


def gather_group_batches(batch: dict, mesh) -> list:
    """The batches of every rank of ``mesh`` (this rank's ``batch`` among them), in mesh order
    (ring rank, then Ulysses rank), the same list on every rank. Tensors travel through host
    memory and come back on ``batch``'s device. Every rank of the mesh calls it."""
    device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), None)
    host = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    items = [((mesh.ring_rank, mesh.ulysses_rank), host)]
    for group, degree in ((mesh.ulysses_group, mesh.ulysses_degree),
                          (mesh.ring_group, mesh.ring_degree)):
        if degree > 1:
            parts = [None] * degree
            dist.all_gather_object(parts, items, group=group)
            items = [item for part in parts for item in part]
    ordered = [b for _, b in sorted(items, key=lambda item: item[0])]
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in ordered]


class SPDataLoaderAdapter:
    """Wrap a per-rank data loader for one SP group.

    ``dataloader`` yields this rank's batches (dicts that ``dtf.shard_batch`` takes: full
    sequences, ``input_ids`` plus optional ``labels``, ``position_ids`` of packed rows, an
    all-ones ``attention_mask``); every rank of ``mesh`` must yield as many. For each of its
    batches the adapter yields ``mesh.size`` local batches: the batches of the group's ranks
    in mesh order, each sharded for this rank with ``dtf.shard_batch(batch, mesh, layout)``
    (``input_ids``, ``position_ids``, ``shift_labels``, and ``distattn_cu_seqlens`` for
    packed rows). ``len`` is ``mesh.size * len(dataloader)``. Other attributes (``dataset``,
    ``sampler``, ``batch_sampler``, ...) are the wrapped loader's; ``set_epoch`` is passed on.
    """

    def __init__(self, dataloader, mesh, layout: str = "zigzag"):
        self.dataloader = dataloader
        self.mesh = as_mesh(mesh)
        self.layout = layout

    def __iter__(self):
        for batch in self.dataloader:
            if not isinstance(batch, dict):
                batch = dict(batch)     # transformers' BatchEncoding is a mapping
            for full in gather_group_batches(batch, self.mesh):
                yield shard_batch(full, self.mesh, layout=self.layout)

    def __len__(self) -> int:
        return len(self.dataloader) * self.mesh.size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(epoch)

    def __getattr__(self, name):
        if name == "dataloader":        # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataloader, name)


def token_share_loss(logits: torch.Tensor, shift_labels: torch.Tensor,
                     num_items) -> torch.Tensor:
    """This rank's share of the token-mean cross entropy of a global batch: the sum over this
    rank's labelled tokens (``shift_labels`` != -100; in float32, fp64 for fp64 logits)
    divided by ``num_items``, the labelled tokens of the whole global batch (every rank's,
    each token once). Summed over every rank it is the global loss, and so are its
    gradients."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype),
                                shift_labels.reshape(-1).to(logits.device),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    return local_sum / torch.as_tensor(num_items, device=local_sum.device).clamp(min=1)


class SPTrainer(Trainer):
    """``transformers.Trainer`` for a model whose attention is registered by ``dtf.register``
    on ``mesh`` (keyword-only; ``layout`` defaults to the registered one). All other arguments
    are ``Trainer``'s; the train dataset / collator give full sequences, as without SP.

    Training equals one process training on each step's global batch (every SP group's
    batch, every accumulated micro-batch): see the module docstring for the loss and the
    gradient averaging. The Trainer's processes must be the data-parallel replicas times the
    SP ranks (the usual (dp, sp) layout: every process is in one SP group of ``mesh``'s
    shape). Raises for what it does not do: a model whose attention is not distattn's on
    ``mesh``, ``average_tokens_across_devices=False``, label smoothing, ``compute_loss_func``,
    DataParallel over several GPUs in one process, and evaluation / prediction loaders.
    """

    def __init__(self, *args, mesh, layout: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mesh = as_mesh(mesh)
        name = getattr(self.model.config, "_attn_implementation", None)
        attention = _registry.attention(name) if isinstance(name, str) else None
        if attention is None or attention.mesh is not self.mesh:
            raise ValueError(
                f"SPTrainer: the model's attention {name!r} is not distattn's on this mesh: "
                f"call dtf.register(mesh, layout=...) with the mesh passed as mesh= and "
                f"create the model with attn_implementation=<the name it returns> (or "
                f"dtf.set_attn_implementation(model, name))")
        if layout is not None and layout != attention.layout:
            raise ValueError(f"SPTrainer: layout={layout!r} differs from the layout "
                             f"{attention.layout!r} the model's attention {name!r} was "
                             f"registered with; pass the same one (or none)")
        self.layout = attention.layout
        for flag, fix in ((not self.args.average_tokens_across_devices,
                           "average_tokens_across_devices=False (SPTrainer averages over the "
                           "tokens of every device: leave it True)"),
                          (self.args.label_smoothing_factor != 0,
                           "label_smoothing_factor (set it to 0)"),
                          (self.compute_loss_func is not None,
                           "compute_loss_func (SPTrainer computes the loss itself)"),
                          (self.args.n_gpu > 1,
                           "several GPUs in one process (launch one process per GPU)")):
            if flag:
                raise ValueError(f"SPTrainer does not support {fix}")
        processes = self.accelerator.num_processes
        if processes % self.mesh.size:
            raise ValueError(f"SPTrainer: {processes} processes do not split into SP groups "
                             f"of {self.mesh.size} ranks (the mesh's size)")
        hf.loss_is_normalized(self)

    def get_train_dataloader(self):
        return SPDataLoaderAdapter(super().get_train_dataloader(), self.mesh, self.layout)

    def get_eval_dataloader(self, eval_dataset=None):
        raise NotImplementedError("SPTrainer trains only: evaluate the model outside the "
                                  "Trainer (shard batches with dtf.shard_batch, loss with "
                                  "dtf.sp_loss)")

    def get_test_dataloader(self, test_dataset):
        raise NotImplementedError("SPTrainer trains only: predict with the model outside the "
                                  "Trainer (dtf.shard_batch, then distattn.unshard the logits)")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and the labelled tokens of the step's global batch (summed
        over every process: SP ranks hold disjoint tokens, so each is counted once)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = sum((b["shift_labels"] != IGNORE_INDEX).sum() for b in batch_samples)
        count = torch.as_tensor(count, dtype=torch.int64, device=device)
        dist.all_reduce(count)
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "shift_labels" not in inputs:
            raise ValueError("SPTrainer.compute_loss needs a batch from SPDataLoaderAdapter "
                             "(with 'shift_labels'), got keys " + str(sorted(inputs)))
        shift_labels = inputs.pop("shift_labels")
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
            dist.all_reduce(num_items_in_batch)
        outputs = model(**inputs, use_cache=False)
        _REACHED.check(outputs.logits)      # its attention ran through distattn (as sp_loss)
        # DDP averages over the processes: scale so that it sums the shares.
        loss = token_share_loss(outputs.logits, shift_labels, num_items_in_batch) * \
            self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
