"""Frozen evaluators: a contrastive embedder (diversity) and an attribute classifier (quality).

Both are trained on real sequences only, never on generations, and are frozen
afterwards. Nothing here assumes melodies: any dataset the system accepts
(the Essen builder or an imported npz) works.

Plug-in interface (interface.py): a pure function and its params.

    Embedder(apply, params)
        apply(params, tokens_BxT int32) -> emb_BxD float32, unit vectors
        embedder(tokens_BxT) -> emb_BxD  (jitted)
    QualityModel(apply, params, predict=None, attribute_names=())
        apply(params, tokens_BxT, prompt_BxC) -> probs_BxA: P(prompt's value) per attribute
        quality_model.quality(tokens_BxT, prompt_BxC) -> [B], the mean over A
        predict(params, tokens_BxT) -> prompt ids [B, C] (optional; accuracy figures only)

Token rows are the dataset's ids (events, EOS, PAD...); whatever follows a
row's first EOS is ignored. `apply` is called inside the finetuning step's jit
(`embedder.apply(embedder.params, tokens)`), so it must be pure and jittable
and `params` a pytree of arrays. A user's own model, e.g. a MuLan-like audio
embedder, plugs in as

    Embedder(apply=lambda _, tokens_BxT: my_unit_vectors(tokens_BxT), params={})

Trained ones load from their run directory onto any mesh:

    load_embedder(DIR/embedder, mesh=None, rules=None) -> Embedder
    load_quality_model(DIR/classifier, mesh=None, rules=None) -> QualityModel
    frozen_models(WorkDir(DIR), embedder=None, quality_model=None) -> both, each the work
        directory's unless given (the other one None when one is given and the other absent)

Measures (metrics.py):

    diversity(embedder, tokens_PxKxT) -> scalar: mean over prompts of the mean
        pairwise (1 - cos) among the K generations of each prompt (i != j)
    pairwise_dissimilarity(emb_PxKxD, tokens_PxKxT=None) -> [P, K, K] of 1 - cos
        (with the tokens: exactly 0 between identical sequences)
    quality(quality_model, tokens_BxT, prompt_BxC) -> (mean [B], per attribute [B, A])
    shared_ngram_fraction(tokens_PxKxT, n=4) -> float, model-free (1 = copies)
    metrics.diversity_per_prompt / prefix_diversity_per_prompt (length-matched pairs) /
        shared_ngram_fraction_per_prompt -> [P], and metrics.fidelity_figures: the
        per-prompt forms the evaluation bootstraps (bootstrap.py: Figure, resample,
        interval, hypervolume)
    fidelity(rows, FidelityReference.from_rows(train_rows, heldout_rows))
        -> {'unseen_2gram', 'unseen_3gram', 'length_gap', 'length_w1', 'length_off_grid'},
        model-free
    retrieval_accuracy(embedder, tokens_NxT, chunk_len) -> {'top1', 'top5', 'chance', ...}
    classifier_accuracy(quality_model, tokens_NxT, prompt_NxC)
        -> {attribute: {'accuracy', 'majority_rate', 'balanced_accuracy', 'balanced_chance'}}

Stages (python -m diverse_cfg.main --stage=embedder|classifier ...) train
them with the shared loop and write held-out figures to DIR/<stage>/heldout.json.
"""

from diverse_cfg import workdir as workdir_lib
from diverse_cfg.evaluators.classifier import load_quality_model
from diverse_cfg.evaluators.embedder import load_embedder
from diverse_cfg.evaluators.interface import Embedder
from diverse_cfg.evaluators.interface import QualityModel
from diverse_cfg.evaluators.metrics import classifier_accuracy
from diverse_cfg.evaluators.metrics import diversity
from diverse_cfg.evaluators.metrics import fidelity
from diverse_cfg.evaluators.metrics import FidelityReference
from diverse_cfg.evaluators.metrics import pairwise_dissimilarity
from diverse_cfg.evaluators.metrics import quality
from diverse_cfg.evaluators.metrics import retrieval_accuracy
from diverse_cfg.evaluators.metrics import shared_ngram_fraction


def frozen_models(workdir, embedder=None, quality_model=None):
  """(embedder, quality model): each the one given, else the work directory's.

  With neither given both must be in the work directory (a clear error names the one
  missing); with one given, the other is loaded when the work directory has it, else None
  (finetuning needs no quality model; its periodic evaluation then skips quality).
  """
  if embedder is None and quality_model is None:
    return load_embedder(workdir.embedder), load_quality_model(workdir.classifier)
  if embedder is None and workdir_lib.find_checkpoints(workdir.embedder):
    embedder = load_embedder(workdir.embedder)
  if quality_model is None and workdir_lib.find_checkpoints(workdir.classifier):
    quality_model = load_quality_model(workdir.classifier)
  return embedder, quality_model
