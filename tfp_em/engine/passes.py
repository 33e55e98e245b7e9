"""E-step passes over data: in memory, streamed over tf.data, or distributed.

Stats are sums over data points, so a pass over batches (or replicas) adds
the per-batch stats. Fields named in `model.shared_stats_fields` (a centring
point, say) are the same in every batch of one pass and are taken, not added.
In-memory data under a strategy is cut into one shard per replica by
`model.split_data(data, num_shards)` (row blocks by default; the mixed model
keeps whole clusters together).

    pass_ = make_pass(model, data, compile='graph', strategy=None)
    stats, loglik = pass_(params)
"""
from __future__ import annotations

import tensorflow as tf

from tfp_em.engine.compiling import compile_fn, compiled_e_step
from tfp_em.engine.streams import checked_batches


def add_stats(model, a, b):
  """a + b for every field except the shared ones (taken from b)."""
  shared = model.shared_stats_fields
  return type(a)(*[vb if name in shared else va + vb
                   for name, va, vb in zip(a._fields, a, b)])


def is_stream(data) -> bool:
  return isinstance(data, tf.data.Dataset)


def check_summable(model, over: str) -> None:
  """Refuses to combine stats `over` batches or replicas when some are per point."""
  fields = model.per_point_stats_fields
  if fields:
    raise ValueError(
        f"{model.name}: its E-step statistics {list(fields)} are per data point, not sums, so "
        f"they cannot be added {over}; fit it on in-memory data (a tuple of tensors) without "
        f"a strategy{'; ' + model.summable_hint if model.summable_hint else ''}")


class InMemoryPass:
  """One compiled E-step over data held in memory."""

  def __init__(self, model, data, compile: str):
    self.data = data
    self._e_step = compiled_e_step(model, compile)
    self.num_observations = float(model.num_observations(data))

  def __call__(self, params):
    return self._e_step(params, self.data)

  def first_batch(self):
    return self.data


class _BatchedPass:
  """Adds per-batch stats over one pass; counts observations on the first."""
  num_observations = None

  def _accumulate(self, batches, step):
    total, n_obs = None, 0.0
    for batch in checked_batches(batches):
      stats, ll = step(batch)
      if self.num_observations is None:
        n_obs += float(self.model.num_observations(batch))
      total = (stats, ll) if total is None else (add_stats(self.model, total[0], stats),
                                                 total[1] + ll)
    if total is None:
      raise ValueError("the dataset is empty: one pass produced no batches")
    if self.num_observations is None:
      self.num_observations = n_obs
    return total

  def first_batch(self):
    return next(checked_batches(self.dataset))


class StreamPass(_BatchedPass):
  """Accumulates per-batch stats over one pass of a `tf.data.Dataset`.

  Memory is bounded by the batch size: one batch is resident at a time.
  """

  def __init__(self, model, dataset: tf.data.Dataset, compile: str):
    self.model = model
    self.dataset = dataset
    self._e_step = compiled_e_step(model, compile)

  def __call__(self, params):
    return self._accumulate(self.dataset, lambda batch: self._e_step(params, batch))


class DistributedPass(_BatchedPass):
  """E-step per replica under a `tf.distribute` strategy, all-reduced by SUM.

  Every replica evaluates the same params, so shared fields agree and are
  taken from the first replica.
  """

  def __init__(self, model, dataset: tf.data.Dataset, strategy, compile: str, shards=None,
               whole=None):
    self.model = model
    self.strategy = strategy
    self.dataset = dataset
    self._whole = whole
    if shards is None:
      self._dist = strategy.experimental_distribute_dataset(dataset)
    else:  # one self-contained shard per replica, in replica order; `whole` for initialize
      self.dataset = dataset_of(shards)

      def shard_dataset(context):
        mine = shards[context.input_pipeline_id::context.num_input_pipelines]
        return dataset_of(mine)

      self._dist = strategy.distribute_datasets_from_function(shard_dataset)
    e_step = compile_fn(model.e_step, compile if compile != "xla" else "graph")
    shared = model.shared_stats_fields

    @tf.function
    def step(params, batch):
      stats, ll = strategy.run(e_step, args=(params, batch))
      reduced = [strategy.experimental_local_results(v)[0] if name in shared
                 else strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                 for name, v in zip(stats._fields, stats)]
      return type(stats)(*reduced), strategy.reduce(tf.distribute.ReduceOp.SUM, ll, axis=None)

    self._step = step
    # Batches here are PerReplica values: count once on the undistributed data.
    self.num_observations = float(sum(float(model.num_observations(b))
                                      for b in checked_batches(self.dataset)))

  def __call__(self, params):
    return self._accumulate(self._dist, lambda batch: self._step(params, batch))

  def first_batch(self):
    return self._whole if self._whole is not None else super().first_batch()


def dataset_of(parts) -> tf.data.Dataset:
  """A dataset whose elements are `parts` (tuples of tensors; shapes may differ)."""
  out = tf.data.Dataset.from_tensors(parts[0])
  for part in parts[1:]:
    out = out.concatenate(tf.data.Dataset.from_tensors(part))
  return out


def make_pass(model, data, compile: str = "graph", strategy=None):
  """Chooses the pass for `data`: a tuple of tensors or a `tf.data.Dataset`."""
  if strategy is not None:
    check_summable(model, "across the replicas of a tf.distribute strategy")
  elif is_stream(data):
    check_summable(model, "across the batches of a tf.data.Dataset")
  if strategy is not None:
    if is_stream(data):
      return DistributedPass(model, data, strategy, compile)
    shards = model.split_data(data, strategy.num_replicas_in_sync)
    return DistributedPass(model, None, strategy, compile, shards=shards, whole=data)
  if is_stream(data):
    return StreamPass(model, data, compile)
  return InMemoryPass(model, data, compile)

