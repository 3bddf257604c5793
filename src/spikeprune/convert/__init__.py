"""ANN→SNN conversion, and DynSNN on converted networks (docs/methods.md §3 item 5).

Modules: :mod:`.ann` (the ReLU twin, its training, BN folding), :mod:`.snn` (calibration, :class:`ConvertedSNN`,
accuracy vs T), :mod:`.dynsnn` (fading units masked post-training), :mod:`.run` (the ``convert`` recipe and
pipeline).

Pipeline::

    ann = make_ann("lenet5")                       # ReLU twin of a zoo model (plain torch layers)
    train_ann(ann, train_loader, test_loader, epochs=10)
    lam = calibrate(ann, calib_loader, "percentile", 99.9)
    snn = to_snn(ann, lam, T=128)                  # IF neurons, reset by subtraction, direct input
    accuracy_vs_T(snn, test_loader, Ts=(8, 16, 32, 64, 128, 256))
    res = dynsnn_convert(snn, calib_loader, target_compression=0.6)   # mask fading units, re-balance

Choices (record them with results):

* **ANN twin** — :func:`ann_from_snn` mirrors a zoo model layer by layer: neurons become ``ReLU``, the direct
  encoder ``Repeat`` is dropped (T=1, static input), ``Dropout`` is kept for training and skipped by conversion.
  ``train_ann`` can add a firing-rate penalty (``activity_l1``) or a unit-level Hoyer sparsity penalty
  (``unit_hoyer``) on the hidden ReLUs [R], so the units the task does not need fade during training (DynSNN then
  finds them).
  Max-pooling is refused: the max of spike trains is not the spike train of the max (the usual fixes — gating by
  rate or lateral inhibition — are not implemented). Spiking read-outs and voting layers are refused as well.
* **BN folding** — :func:`fold_bn` merges every BatchNorm into the Conv/Linear right before it (eval statistics).
* **Calibration** (Diehl et al. 2015, Rueckauer et al. 2017) — λ_ℓ is the maximum of layer ℓ's ReLU output over
  the calibration set (``"max"``) or a percentile of its *positive* values (``"percentile"``, zeros left out as
  in the SNN Toolbox); one λ per layer.
* **Normalisation by thresholds** (our choice among the equivalent forms) — the synaptic weights stay the ANN's
  weights; layer ℓ's IF neurons get ``V_th,ℓ = λ_ℓ / λ_{ℓ-1}`` and its bias becomes ``b_ℓ / λ_{ℓ-1}``
  (λ_0 = 1: the analog input). A spike of layer ℓ then stands for the activation λ_ℓ, the firing rate
  approximates ``clip(a_ℓ / λ_ℓ, 0, 1)``, and the spike trains equal those of Rueckauer's weight normalisation
  (``W_ℓ λ_{ℓ-1}/λ_ℓ``, ``V_th = 1``) up to rounding. The read-out layer's input is multiplied back by
  ``λ_{L-1}`` (``output_scale``) so the logits are on the ANN's scale.
* **IF neurons** — reset by subtraction (``v_reset=None``), initial membrane ``v_init · V_th`` with
  ``v_init = 0.5`` by default (rounds the rate instead of flooring it, halving the quantisation error at small T).
* **Direct input** — the first Conv/Linear sees the analog image; its output is computed once and repeated T times
  (the same as feeding the image every step). The read-out layer is a non-spiking accumulator: the model outputs
  its input current ``[T, B, K]``; the mean over T is its membrane potential / T.
* **DynSNN on converted nets** [R] — per-unit firing rates (channel means in conv layers) on a calibration subset;
  unit ``i`` of layer ℓ fades when ``rate_i < κ · mean_ℓ(rate)``; with ``target_compression`` the smallest κ that
  reaches it is found by bisection. Units are masked with the mask engine's unit masks (at least ``min_alive`` of
  each layer survive). Optionally (``compensate``, [R]) the mean input each dead unit sent to its consumers is
  folded into their biases (mean replacement). Then thresholds are re-balanced: the calibration is re-run on the
  masked ANN (dead units' fan-in rows and biases zeroed) and λ, V_th and the biases are updated. Compression =
  ``1 − density`` of the effective weights (a masked unit loses its fan-in row and fan-out column), as
  :func:`spikeprune.measure.measure` reports it.
"""


from .ann import ann_from_snn, evaluate_ann, fold_bn, make_ann, train_ann
from .dynsnn import DynSNNConvertResult, _fading_masks, dynsnn_convert  # noqa: F401  (tests use the rule)
from .run import ConvertRunConfig, load_convert_config, plot_accuracy_vs_T, run_convert, write_table
from .snn import ConversionIF, ConvertedSNN, accuracy_vs_T, calibrate, firing_rates, set_lambdas, snn_to_ann, to_snn

__all__ = [
    "make_ann", "ann_from_snn", "train_ann", "evaluate_ann", "fold_bn", "calibrate", "ConversionIF",
    "ConvertedSNN", "to_snn", "snn_to_ann", "set_lambdas", "accuracy_vs_T", "firing_rates", "dynsnn_convert",
    "DynSNNConvertResult", "ConvertRunConfig", "load_convert_config", "run_convert", "plot_accuracy_vs_T",
    "write_table",
]
