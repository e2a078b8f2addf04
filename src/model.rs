//! The sentence VAE: a convolutional encoder for q(z|x) and an LSTM decoder for p(x|z).
//!
//! Encoder: embeddings -> wide 1-D convolutions of several widths (Kim 2014) -> masked
//! max-over-time pooling (pooling over time helps against posterior collapse, Long et al. 2019)
//! -> linear heads for `mu` and `logvar`. Decoder: an LSTM language model conditioned on z, both
//! through its initial state h0 = tanh(W z) and through z concatenated to every input embedding
//! (Bowman et al. 2016), so the decoder cannot forget z over a long sentence.

use tch::nn::{self, Module, ModuleT, RNN};
use tch::{Device, Kind, Tensor};

use crate::config::{DropoutMask, ModelConfig};
use crate::data::{Batch, RealTokens};
use crate::native;
use crate::prior::Prior;
use crate::tokenizer::PAD;

pub struct Encoder {
    /// [V, E] token embeddings: the encoder's own, or the decoder's (`share_embeddings`).
    emb: Tensor,
    convs: Vec<(i64, nn::Conv1D)>,
    mu: nn::Linear,
    logvar: nn::Linear,
    /// BN-VAE (Zhu et al. 2020): batch normalisation of `mu` with a fixed scale gamma.
    mu_bn: Option<MuBatchNorm>,
    /// Dropout on the pooled features (training only).
    dropout: f64,
}

/// Batch normalisation of the posterior means with a fixed scale `gamma` and a learned shift
/// (Zhu et al. 2020, BN-VAE). Each dimension's means then vary across sentences with variance
/// gamma^2, so E_x[KL] >= Z gamma^2 / 2: the code cannot collapse, and it is held by what
/// differs between sentences rather than by noise.
struct MuBatchNorm {
    bn: nn::BatchNorm,
    gamma: f64,
    beta: Tensor,
}

impl MuBatchNorm {
    fn forward(&self, mu: &Tensor, train: bool) -> Tensor {
        // Batch statistics need two sentences; a lone one uses the running statistics.
        let train = train && mu.size()[0] > 1;
        self.bn.forward_t(mu, train) * self.gamma + &self.beta // [B, Z]
    }
}

impl Encoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let emb = nn::embedding(&p / "emb", cfg.vocab_size, cfg.emb_dim, Default::default());
        Self::with_embedding(p, cfg, emb.ws)
    }

    /// An encoder that reads tokens through the given embedding matrix `emb` [V, E].
    pub fn with_embedding(p: nn::Path, cfg: &ModelConfig, emb: Tensor) -> Self {
        let convs = cfg
            .kernel_widths
            .iter()
            .map(|&k| {
                // Wide convolution (padding k-1 on both sides): a sentence shorter than the
                // kernel still gives features.
                let conv_cfg = nn::ConvConfig {
                    padding: k - 1,
                    ..Default::default()
                };
                let conv = nn::conv1d(
                    &p / format!("conv{k}"),
                    cfg.emb_dim,
                    cfg.conv_filters,
                    k,
                    conv_cfg,
                );
                (k, conv)
            })
            .collect();
        let features = cfg.conv_filters * cfg.kernel_widths.len() as i64;
        let mu = nn::linear(&p / "mu", features, cfg.latent_dim, Default::default());
        let logvar = nn::linear(&p / "logvar", features, cfg.latent_dim, Default::default());
        let mu_bn = (cfg.bn_gamma > 0.0).then(|| {
            let bn_cfg = nn::BatchNormConfig {
                affine: false,
                ..Default::default()
            };
            MuBatchNorm {
                bn: nn::batch_norm1d(&p / "mu_bn", cfg.latent_dim, bn_cfg),
                gamma: cfg.bn_gamma,
                beta: (&p / "mu_bn").zeros("shift", &[cfg.latent_dim]),
            }
        });
        Self {
            emb,
            convs,
            mu,
            logvar,
            mu_bn,
            dropout: cfg.enc_dropout,
        }
    }

    /// `tokens` [B, T] (padded with `<pad>`), `lengths` [B] -> (`mu`, `logvar`), each [B, Z].
    /// `train` lets batch normalisation of `mu` (BN-VAE) use and update batch statistics.
    pub fn forward(&self, tokens: &Tensor, lengths: &Tensor, train: bool) -> (Tensor, Tensor) {
        self.forward_as(tokens, lengths, train, Kind::Float)
    }

    /// `forward` with the convolutions multiplied in number format `kind` (float32 or
    /// bfloat16, weights cast per call); pooling output and heads in float32.
    pub fn forward_as(
        &self,
        tokens: &Tensor,
        lengths: &Tensor,
        train: bool,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let t = tokens.size()[1];
        let real = tokens.ne(PAD).unsqueeze(-1).to_kind(Kind::Float); // [B, T, 1]

        // Zeroed pad embeddings make the padded tail look like the zero padding of the wide
        // convolution, so a sentence's features do not depend on its batch-mates' lengths.
        let e = Tensor::embedding(&self.emb, tokens, -1, false, false); // [B, T, E]
        let x = (e * real).transpose(1, 2).to_kind(kind); // [B, E, T]
        let pooled: Vec<Tensor> = self
            .convs
            .iter()
            .map(|(k, conv)| {
                // The layer's own forward, written out so its weights can take `kind` (a cast
                // to the format they already have is no copy).
                let bs = conv.bs.as_ref().map(|b| b.to_kind(kind));
                let h = x
                    .conv1d(&conv.ws.to_kind(kind), bs, [1], [k - 1], [1], 1)
                    .relu(); // [B, F, T + k - 1]
                let positions = Tensor::arange(t + k - 1, (Kind::Int64, tokens.device()));
                // Output position j covers inputs j-k+1..=j: valid while it touches a real token.
                let valid = positions
                    .unsqueeze(0)
                    .lt_tensor(&(lengths.unsqueeze(1) + (k - 1))); // [B, T+k-1]
                h.masked_fill(&valid.logical_not().unsqueeze(1), f64::NEG_INFINITY)
                    .amax([2].as_slice(), false)
                    .to_kind(Kind::Float) // [B, F]
            })
            .collect();
        let features = Tensor::cat(&pooled, 1); // [B, F * widths]
        let features = sequence_dropout(features, self.dropout, DropoutMask::Token, train);
        let mu = self.mu.forward(&features);
        let mu = match &self.mu_bn {
            Some(bn) => bn.forward(&mu, train),
            None => mu,
        };
        (mu, self.logvar.forward(&features))
    }
}

/// Where z's skip path enters the output layer.
enum ZSkip {
    /// [H, Z]: added to the LSTM output, so it scores words through the output embeddings,
    /// which every position trains: a rare word is reachable from z as well as a common one.
    Hidden(Tensor),
    /// [V, Z]: a logit per word of its own (checkpoints made before `skip_hidden`).
    Logits(Tensor),
}

/// The output layer's weights [V, H] (None when tied to the embedding) and bias [V]: the same
/// names, order and initialisation as `nn::linear`, so untied models are unchanged.
fn output_layer(p: &nn::Path, cfg: &ModelConfig) -> (Option<Tensor>, Tensor) {
    let out = p / "out";
    let bound = 1.0 / (cfg.hidden_dim as f64).sqrt();
    let out_bs = out.var(
        "bias",
        &[cfg.vocab_size],
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    );
    let out_ws = (!cfg.tie_embeddings).then(|| {
        out.var(
            "weight",
            &[cfg.vocab_size, cfg.hidden_dim],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        )
    });
    (out_ws, out_bs)
}

/// The skip path from z to the output layer, in the form `cfg.skip_hidden` names.
fn z_skip_path(p: &nn::Path, cfg: &ModelConfig) -> ZSkip {
    if cfg.skip_hidden {
        ZSkip::Hidden((p / "z_hidden").var(
            "weight",
            &[cfg.hidden_dim, cfg.latent_dim],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        ))
    } else {
        ZSkip::Logits((p / "z_out").var(
            "weight",
            &[cfg.vocab_size, cfg.latent_dim],
            nn::init::DEFAULT_KAIMING_UNIFORM,
        ))
    }
}

/// The training-time dropouts of the decoder LSTM that its own layer cannot apply.
#[derive(Clone, Copy, Debug, Default)]
struct LstmDrops {
    weight_drop: f64,
    layer_dropout: f64,
}

impl LstmDrops {
    fn is_none(&self) -> bool {
        self.weight_drop == 0.0 && self.layer_dropout == 0.0
    }
}

pub struct Decoder {
    emb: nn::Embedding,
    init: nn::Linear,
    lstm: nn::LSTM,
    /// The LSTM's variables in libtorch's order (per layer: w_ih, w_hh, b_ih, b_hh), for running
    /// it in another number format: tch keeps its own list private.
    lstm_weights: Vec<Tensor>,
    /// [V, H] when the projection has its own weights; None when it reuses `emb.ws`.
    out_ws: Option<Tensor>,
    out_bs: Tensor,
    /// The skip path from z to the output layer (`z_skip`).
    skip: Option<ZSkip>,
    num_layers: i64,
    hidden_dim: i64,
    emb_dropout: f64,
    out_dropout: f64,
    weight_drop: f64,
    layer_dropout: f64,
    dropout_mask: DropoutMask,
}

impl Decoder {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        // A tied matrix also scores the output: N(0, 1) entries would start the softmax with
        // logits of size ~sqrt(H), so it starts small as in Press & Wolf's models.
        let emb_cfg = nn::EmbeddingConfig {
            ws_init: if cfg.tie_embeddings {
                nn::Init::Uniform { lo: -0.1, up: 0.1 }
            } else {
                nn::EmbeddingConfig::default().ws_init
            },
            ..Default::default()
        };
        let emb = nn::embedding(&p / "emb", cfg.vocab_size, cfg.emb_dim, emb_cfg);
        let init = nn::linear(
            &p / "init",
            cfg.latent_dim,
            2 * cfg.num_layers * cfg.hidden_dim,
            Default::default(),
        );
        // Dropout inside the LSTM stays 0: tch fixes it at build time and would keep it on
        // while generating. Dropout is applied explicitly with the `train` flag instead.
        let rnn_cfg = nn::RNNConfig {
            num_layers: cfg.num_layers,
            batch_first: true,
            ..Default::default()
        };
        let lstm = nn::lstm(
            &p / "lstm",
            cfg.emb_dim + cfg.latent_dim,
            cfg.hidden_dim,
            rnn_cfg,
        );
        let lstm_weights = (0..cfg.num_layers)
            .flat_map(|l| {
                ["weight_ih", "weight_hh", "bias_ih", "bias_hh"].map(|w| format!("{w}_l{l}"))
            })
            .filter_map(|name| (&p / "lstm").get(&name))
            .collect();
        let (out_ws, out_bs) = output_layer(&p, cfg);
        let skip = cfg.z_skip.then(|| z_skip_path(&p, cfg));
        Self {
            emb,
            init,
            lstm,
            lstm_weights,
            out_ws,
            out_bs,
            skip,
            num_layers: cfg.num_layers,
            hidden_dim: cfg.hidden_dim,
            emb_dropout: cfg.emb_dropout,
            out_dropout: cfg.out_dropout,
            weight_drop: cfg.weight_drop,
            layer_dropout: cfg.layer_dropout,
            dropout_mask: cfg.dropout_mask,
        }
    }

    /// Entries of the output distribution (V).
    pub fn vocab_size(&self) -> i64 {
        self.out_bs.size()[0]
    }

    /// (h0, c0), each [L, B, H], from z [B, Z].
    pub fn init_state(&self, z: &Tensor) -> nn::LSTMState {
        let b = z.size()[0];
        let hc = self
            .init
            .forward(z)
            .tanh()
            .view([b, 2 * self.num_layers, self.hidden_dim]) // [B, 2L, H]
            .transpose(0, 1)
            .contiguous(); // [2L, B, H]
        let mut parts = hc.chunk(2, 0);
        let c = parts.pop().unwrap_or_else(|| Tensor::zeros_like(&hc));
        let h = parts.pop().unwrap_or_else(|| Tensor::zeros_like(&hc));
        nn::LSTMState((h, c))
    }

    fn embed_with_z(&self, tokens: &Tensor, z: &Tensor, train: bool) -> Tensor {
        let e = self.emb.forward(tokens); // [B, T, E]
        let e = sequence_dropout(e, self.emb_dropout, self.dropout_mask, train);
        let t = tokens.size()[1];
        let zt = z.unsqueeze(1).expand([-1, t, -1], false); // [B, T, Z]
        Tensor::cat(&[e, zt], 2) // [B, T, E + Z]
    }

    /// Hidden states for decoder `inputs` [B, T] given z [B, Z]: [B, T, H].
    pub fn hidden(&self, inputs: &Tensor, z: &Tensor, train: bool) -> Tensor {
        self.hidden_as(inputs, z, train, Kind::Float)
    }

    /// `hidden` with the LSTM run in number format `kind` (float32 or bfloat16: its inputs,
    /// state and weights cast, the weights per call; the casts are differentiable, so the
    /// gradients arrive in float32); the hidden states come back in float32. On a GPU the LSTM
    /// stays in float32 whatever `kind` is.
    pub fn hidden_as(&self, inputs: &Tensor, z: &Tensor, train: bool, kind: Kind) -> Tensor {
        let x = self.embed_with_z(inputs, z, train); // [B, T, E + Z]
        let state = self.init_state(z);
        // float32 keeps tch's own layer, which on a GPU holds the weights flattened into the one
        // buffer cuDNN wants. Weights cast per call are separate tensors: cuDNN then warns and
        // compacts them on every call, and on an H100 (bench/results/gpu-20261126T1722Z.md)
        // bf16 training with that was 12% slower than float32 at batch 128 and level at 512.
        // So a GPU keeps float32 and leaves tch's layer only under weight drop, whose masked
        // weights are new tensors every step whatever is done, or under dropout between layers,
        // which tch's layer fixes when it is built (and would then apply while generating).
        let kind = if x.device().is_cuda() {
            Kind::Float
        } else {
            kind
        };
        let drops = self.drops(train);
        let out = if kind == Kind::Float && drops.is_none() {
            self.lstm.seq_init(&x, &state).0
        } else {
            self.lstm_on_weights(&x, state, kind, drops, train)
        };
        sequence_dropout(out, self.out_dropout, self.dropout_mask, train)
    }

    /// Hidden states for scoring (no dropout) of `inputs` [B, T] under the codes z [B*S, Z], the
    /// S codes of a sentence in adjacent rows: [B*S, T, H] in float32, as `hidden_as` of the
    /// inputs repeated S times. On a CPU with the kernels, with one layer, no gradient and S ≥ 2
    /// (the importance-weighted bound), the embeddings' share of the gates is computed once per
    /// sentence rather than once per sample, in float32, and the recurrence runs in `native`'s
    /// LSTM with its product in `kind`; elsewhere libtorch's LSTM runs on the repeated inputs.
    pub fn hidden_shared(&self, inputs: &Tensor, z: &Tensor, kind: Kind) -> Tensor {
        let (b, n) = (inputs.size()[0], z.size()[0]);
        let s = n / b.max(1);
        // With one code per sentence there is nothing to share, and libtorch's float32 LSTM was
        // the faster (PTB test, 512-wide: 31 s against 34-35 s for `eval --iw-samples 1`).
        if s < 2
            || self.num_layers != 1
            || !native::kernels_run_on(z.device())
            || native::grad_mode_enabled()
        {
            let inputs = inputs.repeat_interleave_self_int(s, 0, None); // [B*S, T]
            return self.hidden_as(&inputs, z, false, kind);
        }
        // libtorch's order: w_ih [4H, E + Z], w_hh [4H, H], b_ih, b_hh [4H].
        let [w_ih, w_hh, b_ih, b_hh] = &self.lstm_weights[..] else {
            unreachable!("one LSTM layer has four variables")
        };
        let (e_dim, z_dim) = (self.emb.ws.size()[1], z.size()[1]);
        let x = self
            .emb
            .forward(inputs) // [B, T, E]
            .matmul(&w_ih.narrow(1, 0, e_dim).tr())
            + b_ih
            + b_hh; // [B, T, 4H]
        let w = Tensor::cat(&[w_hh, &w_ih.narrow(1, e_dim, z_dim)], 1).to_kind(kind); // [4H, H + Z]
        let nn::LSTMState((h0, c0)) = self.init_state(z); // [1, B*S, H] each

        // The weights, shapes and devices are this model's own, so a failure is a bug, reported
        // as tch reports its own.
        native::lstm_shared_inputs(&x, &w, &h0.squeeze_dim(0), z, &c0.squeeze_dim(0))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The LSTM's dropouts in a pass: none outside training, none between layers when there is
    /// one layer.
    fn drops(&self, train: bool) -> LstmDrops {
        if !train {
            return LstmDrops::default();
        }
        LstmDrops {
            weight_drop: self.weight_drop,
            layer_dropout: if self.num_layers > 1 {
                self.layer_dropout
            } else {
                0.0
            },
        }
    }

    /// The LSTM run on its weights gathered from the VarStore, cast to `kind`, with a share
    /// `drops.weight_drop` of each layer's hidden-to-hidden weights zeroed (and the rest scaled
    /// by 1 / (1 - weight_drop)) — one mask per call, so every sentence of the batch and every
    /// time step sees the same recurrence — and `drops.layer_dropout` on the outputs of every
    /// layer but the last. The casts and the mask are differentiable: the gradients reach the
    /// float32 variables. Returns [B, T, H] in float32.
    fn lstm_on_weights(
        &self,
        x: &Tensor,
        state: nn::LSTMState,
        kind: Kind,
        drops: LstmDrops,
        train: bool,
    ) -> Tensor {
        let LstmDrops {
            weight_drop,
            layer_dropout,
        } = drops;
        let nn::LSTMState((h, c)) = state;
        let ws: Vec<Tensor> = self
            .lstm_weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                // Per layer: w_ih, w_hh, b_ih, b_hh.
                if i % 4 == 1 && weight_drop > 0.0 {
                    dropout(w, weight_drop).to_kind(kind)
                } else {
                    w.to_kind(kind)
                }
            })
            .collect();
        let hc = [h.to_kind(kind), c.to_kind(kind)];
        let (out, _, _) = x.to_kind(kind).lstm(
            &hc,
            &ws,
            true,
            self.num_layers,
            layer_dropout,
            train,
            false,
            true,
        );
        out.to_kind(Kind::Float) // [B, T, H]
    }

    /// Vocabulary logits from hidden states [..., H] -> [..., V], with z's skip term `skip`
    /// (from [`Self::z_skip`], broadcast over the leading dimensions) when the model has one.
    pub fn project(&self, hidden: &Tensor, skip: Option<&Tensor>) -> Tensor {
        self.project_with(hidden, skip, &self.output_weights(Kind::Float))
    }

    /// The output layer's (weights [V, H], bias [V]) in number format `kind` (float32 or
    /// bfloat16), cast once for every block a pass projects; in float32 the variables
    /// themselves. The casts are differentiable: the gradients arrive in float32.
    pub fn output_weights(&self, kind: Kind) -> (Tensor, Tensor) {
        let ws = self.out_ws.as_ref().unwrap_or(&self.emb.ws);
        (ws.to_kind(kind), self.out_bs.to_kind(kind))
    }

    /// `project` through `weights` from [`Self::output_weights`]: the matrix product in their
    /// number format, the logits in float32 whichever, so the softmax and the loss keep
    /// float32's precision.
    pub fn project_with(
        &self,
        hidden: &Tensor,
        skip: Option<&Tensor>,
        weights: &(Tensor, Tensor),
    ) -> Tensor {
        let (ws, bs) = weights;
        let linear = |h: &Tensor| {
            h.to_kind(ws.kind())
                .linear(ws, Some(bs))
                .to_kind(Kind::Float)
        };
        match (&self.skip, skip) {
            (Some(ZSkip::Hidden(_)), Some(s)) => linear(&(hidden + s)),
            (_, Some(s)) => linear(hidden) + s,
            (_, None) => linear(hidden),
        }
    }

    /// How [`Self::token_nll_with`] scores tokens through `weights` for `hidden`: in one pass over
    /// the logits on a CPU with the kernel (`native`), with the gradient kept in that pass where
    /// autograd records and one is asked of the output layer (training); libtorch's
    /// cross-entropy elsewhere (GPUs) and with z's term on the logits (`--skip-hidden false`),
    /// which is itself [R, V].
    pub fn scoring(&self, hidden: &Tensor, weights: &(Tensor, Tensor)) -> Scoring {
        if matches!(self.skip, Some(ZSkip::Logits(_))) || !native::kernels_run_on(hidden.device()) {
            Scoring::Libtorch
        } else if native::grad_mode_enabled()
            && (hidden.requires_grad() || weights.0.requires_grad())
        {
            Scoring::OnePassWithGrad
        } else {
            Scoring::OnePass
        }
    }

    /// -log p(y | h) of each row: hidden states [R, H], the skip term `skip` ([R, H] or [R, V])
    /// and targets [R] -> [R], as `scoring` ([`Self::scoring`]) says. In one pass the logits
    /// stay the matrix product's [R, V], unbiased and in `weights`' number format, and the
    /// kernel adds the float32 bias and takes the log-softmax at the target in float32;
    /// otherwise libtorch's cross-entropy of [`Self::project_with`]'s float32 logits.
    pub fn token_nll_with(
        &self,
        hidden: &Tensor,
        skip: Option<&Tensor>,
        weights: &(Tensor, Tensor),
        targets: &Tensor,
        scoring: Scoring,
    ) -> Tensor {
        let ws = &weights.0;
        let h = || {
            skip.map_or_else(|| hidden.shallow_clone(), |s| hidden + s)
                .to_kind(ws.kind()) // [R, H]
        };
        // Shapes, kinds and ids are this crate's own (ids below the vocabulary the weights were
        // built for), so a failure of the kernel is a bug, reported as tch reports its own.
        let kernel = |r: anyhow::Result<Tensor>| r.unwrap_or_else(|e| panic!("{e:#}"));
        match scoring {
            Scoring::OnePass => {
                let logits = h().matmul(&ws.tr()); // [R, V]
                kernel(native::token_nll(&logits, &self.out_bs, targets))
            }
            Scoring::OnePassWithGrad => {
                kernel(native::token_nll_grad(&h(), ws, &self.out_bs, targets))
            }
            Scoring::Libtorch => self
                .project_with(hidden, skip, weights)
                .cross_entropy_loss::<Tensor>(targets, None, tch::Reduction::None, -100, 0.0),
        }
    }

    /// z [B, Z] -> its term in every position's output layer through the skip path (Dieng et
    /// al. 2019's generative skip connection, at the output layer): [B, H] added to the LSTM
    /// output (`skip_hidden`) or [B, V] added to the logits. z speaks to the choice of words
    /// directly instead of only through the LSTM's state, so the decoder cannot learn to route
    /// around it. None when the model has no skip path.
    pub fn z_skip(&self, z: &Tensor) -> Option<Tensor> {
        self.skip.as_ref().map(|s| match s {
            ZSkip::Hidden(w) | ZSkip::Logits(w) => z.matmul(&w.tr()), // [B, H] or [B, V]
        })
    }

    /// One generation step: `tokens` [B] -> (logits [B, V], next state). `skip` is
    /// `self.z_skip(z)`, computed once by the caller: z does not change while a sentence is
    /// decoded, so neither does its skip term.
    pub fn step(
        &self,
        tokens: &Tensor,
        z: &Tensor,
        skip: Option<&Tensor>,
        state: &nn::LSTMState,
    ) -> (Tensor, nn::LSTMState) {
        let x = self.embed_with_z(&tokens.unsqueeze(1), z, false); // [B, 1, E + Z]
        let (out, state) = self.lstm.seq_init(&x, state); // [B, 1, H]
        (self.project(&out.squeeze_dim(1), skip), state)
    }
}

/// How the output layer's token NLL is computed ([`Decoder::scoring`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// libtorch's ops: the logits in float32, then cross-entropy.
    Libtorch,
    /// The one-pass kernel, no gradient.
    OnePass,
    /// The one-pass kernel as an autograd function.
    OnePassWithGrad,
}

/// Dropout with probability `p` on `x` [B, T, D] while training: a fresh mask at every
/// position (any shape), or (`DropoutMask::Sentence`) one [B, 1, D] mask that every time step
/// shares.
fn sequence_dropout(x: Tensor, p: f64, mask: DropoutMask, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return x;
    }
    match mask {
        DropoutMask::Token => dropout(&x, p),
        DropoutMask::Sentence => {
            let (b, d) = (x.size()[0], x.size()[2]);
            // Entries 0 or 1 / (1 - p), as dropout scales what it keeps.
            let keep = dropout(&Tensor::ones([b, 1, d], (x.kind(), x.device())), p); // [B, 1, D]
            x * keep
        }
    }
}

/// Training dropout of `x` with probability `p`: on the CPU through noise drawn on every core
/// (`native::dropout_noise`; libtorch's CPU dropout draws its mask on one thread), elsewhere
/// libtorch's own fused kernel.
fn dropout(x: &Tensor, p: f64) -> Tensor {
    if x.device() != Device::Cpu {
        return x.dropout(p, true);
    }
    // The probability is validated with the config and the tensor is this crate's own, so a
    // failure is a bug, reported as tch reports its own.
    let noise = native::dropout_noise(x, p).unwrap_or_else(|e| panic!("{e:#}"));
    x * noise
}

/// Per-sentence summed negative log-likelihood of `targets` [B, T] given decoder hidden states
/// [B, T, H] and the code z [B, Z]: [B]. Only real tokens are projected onto the vocabulary, so
/// padding costs nothing (the output softmax is most of the model's compute) and contributes
/// nothing to the loss. With `rows_per_pass`, the output layer runs over that many tokens at a
/// time (evaluation, under no-grad), so its memory is a [rows, V] block of logits however many
/// samples a pass scores. `kind` is the output layer's number format (`Decoder::output_weights`).
pub fn reconstruction_nll(
    decoder: &Decoder,
    hidden: &Tensor,
    targets: &Tensor,
    real: &RealTokens,
    z: &Tensor,
    rows_per_pass: Option<i64>,
    kind: Kind,
) -> Tensor {
    let b = targets.size()[0];
    let h_dim = hidden.size()[2];
    let h = hidden.reshape([-1, h_dim]).index_select(0, &real.idx); // [N, H]
    let y = targets.reshape([-1]).index_select(0, &real.idx); // [N]
    let skip = decoder.z_skip(z); // [B, H] or [B, V]
    let n = h.size()[0];
    let rows = rows_per_pass.unwrap_or(n).clamp(1, n.max(1));
    let weights = decoder.output_weights(kind);
    let scoring = decoder.scoring(&h, &weights);
    let weights = if scoring == Scoring::OnePass && kind == Kind::BFloat16 {
        column_major(weights)
    } else {
        weights
    };
    let token_nll = |start: i64, len: i64| {
        let sentence = real.sentence.narrow(0, start, len); // [R]
        let skip = skip.as_ref().map(|s| s.index_select(0, &sentence)); // [R, H] or [R, V]
        decoder.token_nll_with(
            &h.narrow(0, start, len),
            skip.as_ref(),
            &weights,
            &y.narrow(0, start, len),
            scoring,
        ) // [R]
    };
    let nll = if rows >= n {
        token_nll(0, n)
    } else {
        let parts: Vec<Tensor> = (0..n)
            .step_by(rows as usize)
            .map(|start| token_nll(start, rows.min(n - start)))
            .collect();
        Tensor::cat(&parts, 0) // [N]
    };
    Tensor::zeros([b], (nll.kind(), nll.device())).index_add(0, &real.sentence, &nll)
}

/// The output layer's weights [V, H] stored as their transpose [H, V], the bias as it is: the
/// one-pass scoring's product h wᵀ then reads a row-major right operand. oneDNN's bfloat16
/// product (AMX) repacks a transposed one on every call: 18.6-29.6 ms against 13.4-15.1 ms
/// for [1677, 512] × [512, 10002]. One copy serves every block of a pass. Float32 through MKL
/// was level either way, so its weights are left as they are.
fn column_major((ws, bs): (Tensor, Tensor)) -> (Tensor, Tensor) {
    (ws.tr().contiguous().tr(), bs) // [V, H], strides [1, V]
}

/// Real tokens per output-layer block in a training step. The logits and their softmax are the
/// largest tensors of a step and autograd keeps every block's, so blocks save no memory at a
/// given moment; what they change is the sizes: with one [N, V] block per batch, N different
/// in every batch, the heap kept under the raised mmap threshold (`runtime::tune_allocator`)
/// could seldom reuse a freed block for the next one and grew (PTB, `--preset ptb`, 2 minutes:
/// 2.0-2.2 GB peak RSS); with most blocks one size, 1.65-1.70 GB at the same speed.
pub const TRAIN_ROWS_PER_PASS: i64 = 2048;

/// The bag-of-words head of Zhao et al. 2017: z -> tanh layer -> logits over the vocabulary
/// [B, V]. It exists only while training (its weights live under `bow/` in the checkpoint and
/// the inference model never reads them).
pub struct BowHead {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl BowHead {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        Self {
            hidden: nn::linear(
                &p / "hidden",
                cfg.latent_dim,
                cfg.hidden_dim,
                Default::default(),
            ),
            out: nn::linear(
                &p / "out",
                cfg.hidden_dim,
                cfg.vocab_size,
                Default::default(),
            ),
        }
    }

    /// z [B, Z] -> bag-of-words logits [B, V].
    pub fn forward(&self, z: &Tensor) -> Tensor {
        self.out.forward(&self.hidden.forward(z).tanh())
    }
}

/// Whether a forward pass trains (dropout on) or evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Train,
    Eval,
}

/// Where a forward pass takes z from: a reparameterised sample of q(z|x), or its mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZFrom {
    Sample,
    Mean,
}

pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub latent_dim: i64,
    /// p(z): N(0, I), or the mixture fitted to the training posteriors after training
    /// (`prior`), read from the weights file beside the network's variables.
    pub prior: Prior,
    /// The number format of the matrix products (convolutions, LSTM, output layer) in
    /// `Pass::Train` forward passes (float32 unless training sets another); `Pass::Eval` forward
    /// passes always take float32.
    pub train_kind: Kind,
}

/// What one forward pass gives the loss.
pub struct VaeOutput {
    /// [B] summed token NLL per sentence.
    pub rec: Tensor,
    /// [B, Z] posterior parameters.
    pub mu: Tensor,
    pub logvar: Tensor,
    /// [B, Z] the code the decoder was given (a sample of q(z|x), or `mu`).
    pub z: Tensor,
}

impl Vae {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let (encoder, decoder) = if cfg.share_embeddings {
            let decoder = Decoder::new(&p / "decoder", cfg);
            let emb = decoder.emb.ws.shallow_clone();
            (Encoder::with_embedding(&p / "encoder", cfg, emb), decoder)
        } else {
            (
                Encoder::new(&p / "encoder", cfg),
                Decoder::new(&p / "decoder", cfg),
            )
        };
        Self {
            encoder,
            decoder,
            latent_dim: cfg.latent_dim,
            prior: Prior::Normal,
            train_kind: Kind::Float,
        }
    }

    /// z = mu + exp(logvar / 2) * eps: the reparameterisation trick (Kingma & Welling 2014).
    pub fn reparameterize(mu: &Tensor, logvar: &Tensor) -> Tensor {
        mu + (logvar * 0.5).exp() * mu.randn_like()
    }

    /// Encodes the batch's targets, takes z from q(z|x) as `z_from` says and scores their
    /// reconstruction from decoder `inputs` (the batch's, or those after word dropout).
    pub fn forward(&self, batch: &Batch, inputs: &Tensor, pass: Pass, z_from: ZFrom) -> VaeOutput {
        let train = pass == Pass::Train;
        let kind = if train { self.train_kind } else { Kind::Float };
        let targets = &batch.targets;
        let (mu, logvar) = self
            .encoder
            .forward_as(targets, &batch.lengths, train, kind);
        let z = match z_from {
            ZFrom::Sample => Self::reparameterize(&mu, &logvar),
            ZFrom::Mean => mu.shallow_clone(),
        };
        let hidden = self.decoder.hidden_as(inputs, &z, train, kind);
        let rows = Some(TRAIN_ROWS_PER_PASS);
        let rec = reconstruction_nll(&self.decoder, &hidden, targets, &batch.real, &z, rows, kind);
        VaeOutput { rec, mu, logvar, z }
    }

    /// Full logits [B, T, V] of the decoder for given z: used to compare models exactly.
    pub fn logits(&self, inputs: &Tensor, z: &Tensor) -> Tensor {
        let skip = self.decoder.z_skip(z).map(|s| s.unsqueeze(1)); // [B, 1, H or V]
        self.decoder
            .project(&self.decoder.hidden(inputs, z, false), skip.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;
    use tch::Device;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 30,
            emb_dim: 8,
            kernel_widths: vec![2, 3],
            conv_filters: 4,
            latent_dim: 4,
            hidden_dim: 16,
            num_layers: 2,
            emb_dropout: 0.5,
            out_dropout: 0.5,
            tie_embeddings: false,
            bn_gamma: 0.0,
            share_embeddings: false,
            z_skip: true,
            skip_hidden: false,
            weight_drop: 0.0,
            layer_dropout: 0.0,
            dropout_mask: DropoutMask::Token,
            enc_dropout: 0.0,
        }
    }

    #[test]
    fn parameter_count_matches_the_built_model() {
        let base = tiny();
        let variants = [
            base.clone(),
            ModelConfig {
                num_layers: 1,
                skip_hidden: true,
                ..base.clone()
            },
            ModelConfig {
                hidden_dim: 8,
                tie_embeddings: true,
                share_embeddings: true,
                bn_gamma: 0.5,
                ..base.clone()
            },
            ModelConfig {
                z_skip: false,
                kernel_widths: vec![3],
                ..base.clone()
            },
            ModelConfig {
                vocab_size: 4000,
                ..ModelConfig::default()
            },
        ];
        for cfg in variants {
            let vs = nn::VarStore::new(Device::Cpu);
            let _vae = Vae::new(vs.root(), &cfg);
            let built: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(cfg.parameter_count(), built, "{cfg:?}");
        }
    }

    #[test]
    fn a_bf16_output_layer_keeps_the_loss_and_float32_gradients() {
        let _rng = crate::seeded(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut vae = Vae::new(
            vs.root(),
            &ModelConfig {
                vocab_size: 300,
                ..tiny()
            },
        );
        let seqs: Vec<Vec<u32>> = vec![vec![5, 60, 7, 280, 9], vec![12, 13], vec![99; 9]];
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&rows, Device::Cpu);
        let z = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let hidden = vae.decoder.hidden(&batch.inputs, &z, false);
        let (nll, grads): (Vec<Tensor>, Vec<Tensor>) = [Kind::Float, Kind::BFloat16]
            .iter()
            .map(|&kind| {
                let nll = reconstruction_nll(
                    &vae.decoder,
                    &hidden,
                    &batch.targets,
                    &batch.real,
                    &z,
                    None,
                    kind,
                );
                let g = Tensor::run_backward(
                    &[nll.sum(Kind::Float)],
                    &[&vae.decoder.out_bs],
                    true,
                    false,
                );
                (nll, g[0].shallow_clone())
            })
            .unzip();
        assert_eq!(nll[1].kind(), Kind::Float);
        assert_eq!(grads[1].kind(), Kind::Float);
        assert!(nll[0].allclose(&nll[1], 1e-2, 1e-2, false), "{nll:?}");
        let cos = (&grads[0] * &grads[1]).sum(Kind::Float) / (grads[0].norm() * grads[1].norm());
        assert!(cos.double_value(&[]) > 0.999, "{cos:?}");
        // Only training passes take the training format: evaluation stays float32.
        vae.train_kind = Kind::BFloat16;
        let eval = vae.forward(&batch, &batch.inputs, Pass::Eval, ZFrom::Mean);
        vae.train_kind = Kind::Float;
        let f32_eval = vae.forward(&batch, &batch.inputs, Pass::Eval, ZFrom::Mean);
        assert!(eval.rec.equal(&f32_eval.rec));
    }

    /// The one-pass output layer (`native`) scores and back-propagates as libtorch's
    /// cross-entropy does, through z's skip path and tied embeddings to every variable it
    /// reaches, with a different weight on every token's NLL; under no-grad it takes the
    /// gradient-free pass with the same figures.
    #[test]
    fn the_one_pass_output_layer_gives_libtorchs_loss_and_gradients() {
        if !native::kernels_run_on(Device::Cpu) {
            return;
        }
        let _rng = crate::seeded(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            vocab_size: 300,
            emb_dim: 16,
            tie_embeddings: true,
            skip_hidden: true,
            ..tiny()
        };
        let vae = Vae::new(vs.root(), &cfg);
        let seqs: Vec<Vec<u32>> = vec![vec![5, 60, 7, 280, 9], vec![12, 13], vec![99; 9]];
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&rows, Device::Cpu);
        let (mu, _) = vae.encoder.forward(&batch.targets, &batch.lengths, false); // [B, Z]
        let hidden = vae.decoder.hidden(&batch.inputs, &mu, false); // [B, T, H]
        let h = hidden
            .reshape([-1, cfg.hidden_dim])
            .index_select(0, &batch.real.idx); // [N, H]
        let y = batch.targets.reshape([-1]).index_select(0, &batch.real.idx); // [N]
        let skip = vae
            .decoder
            .z_skip(&mu)
            .map(|s| s.index_select(0, &batch.real.sentence)); // [N, H]
        let weights = vae.decoder.output_weights(Kind::Float);
        assert_eq!(vae.decoder.scoring(&h, &weights), Scoring::OnePassWithGrad);
        let token_weight = Tensor::rand([h.size()[0]], (Kind::Float, Device::Cpu)) + 0.5;
        let vars: Vec<Tensor> = vs.trainable_variables();
        let params: Vec<&Tensor> = vars.iter().collect();
        let run = |scoring: Scoring| {
            let nll = vae
                .decoder
                .token_nll_with(&h, skip.as_ref(), &weights, &y, scoring);
            let loss = (&nll * &token_weight).sum(Kind::Float);
            (nll, Tensor::run_backward(&[loss], &params, true, false))
        };
        let (ours, ours_grads) = run(Scoring::OnePassWithGrad);
        let (want, want_grads) = run(Scoring::Libtorch);
        assert!(ours.allclose(&want, 1e-5, 1e-5, false), "{ours:?} {want:?}");
        let mut reached = 0;
        for (g, r) in ours_grads.iter().zip(&want_grads) {
            if r.defined() {
                reached += 1;
                assert!(g.allclose(r, 1e-4, 1e-6, false), "{g:?} {r:?}");
            }
        }
        assert!(reached >= 8, "variables reached: {reached}");
        tch::no_grad(|| {
            let (h, skip) = (h.detach(), skip.as_ref().map(Tensor::detach));
            assert_eq!(vae.decoder.scoring(&h, &weights), Scoring::OnePass);
            let nll = vae
                .decoder
                .token_nll_with(&h, skip.as_ref(), &weights, &y, Scoring::OnePass);
            assert!(nll.allclose(&want, 1e-5, 1e-5, false));
        });
    }

    /// A training pass in bfloat16 (convolutions, LSTM, output layer) scores as float32 does,
    /// within bfloat16's rounding, and every variable's gradient comes back in float32 pointing
    /// the same way — the LSTM's (run on weights gathered from the VarStore) and the
    /// convolutions' included. Two layers, so the gathered weights' order is tested too.
    #[test]
    fn a_bf16_training_pass_keeps_the_loss_and_float32_gradients_of_every_variable() {
        let _rng = crate::seeded(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            vocab_size: 300,
            num_layers: 2,
            emb_dropout: 0.0,
            out_dropout: 0.0,
            ..tiny()
        };
        let mut vae = Vae::new(vs.root(), &cfg);
        assert_eq!(vae.decoder.lstm_weights.len(), 8);
        let seqs: Vec<Vec<u32>> = vec![vec![5, 60, 7, 280, 9], vec![12, 13], vec![99; 9]];
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&rows, Device::Cpu);
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let mut run = |kind: Kind| {
            vae.train_kind = kind;
            let out = vae.forward(&batch, &batch.inputs, Pass::Train, ZFrom::Mean);
            let params: Vec<&Tensor> = vars.iter().map(|(_, t)| t).collect();
            let grads = Tensor::run_backward(&[out.rec.sum(Kind::Float)], &params, false, true);
            (out.rec, grads)
        };
        let (rec32, grads32) = run(Kind::Float);
        let (rec16, grads16) = run(Kind::BFloat16);
        assert_eq!(rec16.kind(), Kind::Float);
        assert!(
            rec32.allclose(&rec16, 2e-2, 2e-2, false),
            "{rec32:?} {rec16:?}"
        );
        let mut reached = 0;
        for (((name, _), g32), g16) in vars.iter().zip(&grads32).zip(&grads16) {
            if !g32.defined() {
                continue;
            }
            reached += 1;
            assert_eq!(g16.kind(), Kind::Float, "{name}");
            let cos = (g32 * g16).sum(Kind::Float) / (g32.norm() * g16.norm() + 1e-12);
            assert!(cos.double_value(&[]) > 0.99, "{name}: {cos:?}");
        }
        assert!(
            reached >= 8 + 3,
            "lstm and convolution weights reached: {reached}"
        );
    }

    /// The bound's LSTM (the embeddings' share of the gates once per sentence) against
    /// libtorch's on the inputs repeated, in both number formats.
    #[test]
    fn the_scoring_lstm_on_shared_inputs_gives_libtorchs_hidden_states() {
        let _rng = crate::seeded(6);
        let vs = nn::VarStore::new(Device::Cpu);
        // H = 40: the kernel's vector body and its scalar tail (chunks of 16 or 32 floats).
        let cfg = ModelConfig {
            hidden_dim: 40,
            num_layers: 1,
            ..tiny()
        };
        let vae = Vae::new(vs.root(), &cfg);
        let inputs = Tensor::from_slice(&[1i64, 5, 6, 7, 8, 9, 1, 12, 13, 0]).view([2, 5]); // [B, T]
        let s = 3;
        let z = Tensor::randn([2 * s, 4], (Kind::Float, Device::Cpu)); // [B*S, Z]
        let repeated = inputs.repeat_interleave_self_int(s, 0, None); // [B*S, T]
        tch::no_grad(|| {
            for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 1e-2)] {
                let ours = vae.decoder.hidden_shared(&inputs, &z, kind);
                let want = vae.decoder.hidden_as(&repeated, &z, false, kind);
                assert_eq!(ours.size(), [6, 5, 40]);
                assert_eq!(ours.kind(), Kind::Float);
                let gap = (&ours - &want).abs().max().double_value(&[]);
                assert!(gap < tol, "{kind:?}: largest difference {gap}");
            }
        });
        // Where autograd records, libtorch's LSTM runs (the kernel has no backward pass).
        let ours = vae.decoder.hidden_shared(&inputs, &z, Kind::Float);
        assert!(ours.requires_grad());
    }

    /// Weight drop masks the recurrent weights, not the activations: two copies of a sentence in
    /// one batch get the same hidden states under it, two training passes differ, evaluation
    /// passes are untouched, and every LSTM weight still gets a gradient.
    #[test]
    fn weight_drop_shares_one_mask_per_pass_and_only_while_training() {
        let _rng = crate::seeded(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            emb_dropout: 0.0,
            out_dropout: 0.0,
            weight_drop: 0.5,
            ..tiny()
        };
        let vae = Vae::new(vs.root(), &cfg);
        let inputs = Tensor::from_slice(&[5i64, 6, 7, 8, 5, 6, 7, 8]).view([2, 4]); // [B, T]
        let z = Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.4])
            .view([1, 4])
            .repeat([2, 1]); // [B, Z]
        let dec = &vae.decoder;
        let train_a = dec.hidden(&inputs, &z, true);
        let train_b = dec.hidden(&inputs, &z, true);
        let eval = dec.hidden(&inputs, &z, false);
        assert!(train_a.get(0).allclose(&train_a.get(1), 1e-6, 1e-6, false));
        assert!(!train_a.allclose(&train_b, 1e-4, 1e-4, false));
        assert!(!train_a.allclose(&eval, 1e-4, 1e-4, false));
        // Evaluation runs tch's own layer; the gathered weights with nothing dropped agree.
        let x = dec.embed_with_z(&inputs, &z, false); // [B, T, E + Z]
        let none = LstmDrops::default();
        let gathered = dec.lstm_on_weights(&x, dec.init_state(&z), Kind::Float, none, false);
        assert!(eval.allclose(&gathered, 1e-5, 1e-5, false));
        train_a.sum(Kind::Float).backward();
        for (i, w) in dec.lstm_weights.iter().enumerate() {
            let g = w.grad();
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "weight {i}"
            );
        }
    }

    /// The encoder's feature dropout draws a new mask per training pass and leaves evaluation
    /// untouched.
    #[test]
    fn encoder_dropout_acts_only_while_training() {
        let _rng = crate::seeded(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            enc_dropout: 0.5,
            ..tiny()
        };
        let enc = Vae::new(vs.root(), &cfg).encoder;
        let tokens = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 6, 7, PAD]).view([2, 4]); // [B, T]
        let lengths = Tensor::from_slice(&[4i64, 3]);
        let (train_a, _) = enc.forward(&tokens, &lengths, true);
        let (train_b, _) = enc.forward(&tokens, &lengths, true);
        let (eval_a, _) = enc.forward(&tokens, &lengths, false);
        let (eval_b, _) = enc.forward(&tokens, &lengths, false);
        assert!(train_a.not_equal_tensor(&train_b).any().int64_value(&[]) == 1);
        assert!(eval_a.equal(&eval_b));
        let none = Vae::new(vs.root() / "plain", &tiny()).encoder;
        let (plain_a, _) = none.forward(&tokens, &lengths, true);
        let (plain_b, _) = none.forward(&tokens, &lengths, true);
        assert!(plain_a.equal(&plain_b));
    }

    /// Dropout between layers acts only while training and only between stacked layers: a
    /// one-layer decoder trains as if it were off, a two-layer one draws a new mask per pass
    /// and evaluates untouched.
    #[test]
    fn layer_dropout_acts_between_stacked_layers_only_while_training() {
        let inputs = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 6, 7, 8]).view([2, 4]); // [B, T]
        let z = Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.4, 0.0, 0.2, -0.1, 0.5]).view([2, 4]); // [B, Z]
        for num_layers in [1, 2] {
            let _rng = crate::seeded(6);
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = ModelConfig {
                emb_dropout: 0.0,
                out_dropout: 0.0,
                layer_dropout: 0.5,
                num_layers,
                ..tiny()
            };
            let dec = Vae::new(vs.root(), &cfg).decoder;
            let train_a = dec.hidden(&inputs, &z, true);
            let train_b = dec.hidden(&inputs, &z, true);
            let eval = dec.hidden(&inputs, &z, false);
            let drops = num_layers > 1;
            assert_eq!(!train_a.allclose(&train_b, 1e-5, 1e-5, false), drops);
            assert_eq!(!train_a.allclose(&eval, 1e-5, 1e-5, false), drops);
            let x = dec.embed_with_z(&inputs, &z, false); // [B, T, E + Z]
            let none = LstmDrops::default();
            let plain = dec.lstm_on_weights(&x, dec.init_state(&z), Kind::Float, none, false);
            assert!(eval.allclose(&plain, 1e-5, 1e-5, false));
        }
    }

    /// A sentence mask keeps or drops a unit for every time step of a sentence, a token mask
    /// draws per position; both keep about 1 - p of the units, scaled by 1 / (1 - p), and
    /// neither acts outside training.
    #[test]
    fn sentence_dropout_masks_are_shared_over_time() {
        let _rng = crate::seeded(3);
        let x = Tensor::ones([8, 12, 64], (Kind::Float, Device::Cpu)); // [B, T, D]
        for mask in [DropoutMask::Token, DropoutMask::Sentence] {
            let y = sequence_dropout(x.shallow_clone(), 0.5, mask, true); // [B, T, D]
            let kept = y.ne(0.0).to_kind(Kind::Float);
            let share = kept.mean(Kind::Float).double_value(&[]);
            assert!((share - 0.5).abs() < 0.05, "{mask:?} kept {share}");
            assert!(y.eq(0.0).logical_or(&y.eq(2.0)).all().int64_value(&[]) == 1);
            // Over time, a unit's mask varies only when drawn per token.
            let varies = kept.std_dim([1].as_slice(), false, false).gt(0.0).any();
            assert_eq!(varies.int64_value(&[]) == 1, mask == DropoutMask::Token);
            let eval = sequence_dropout(x.shallow_clone(), 0.5, mask, false);
            assert!(eval.equal(&x));
        }
    }

    #[test]
    fn padded_batch_loss_equals_sum_of_single_sentence_losses() {
        let _rng = crate::seeded(0);
        let vs = nn::VarStore::new(Device::Cpu);
        // The skip path through the hidden size is the default; `tiny` has the per-word one.
        let vae = Vae::new(
            vs.root(),
            &ModelConfig {
                skip_hidden: true,
                ..tiny()
            },
        );
        let seqs: Vec<Vec<u32>> = vec![
            vec![5, 6, 7, 8, 9, 10, 11],
            vec![12],
            vec![13, 14, 15],
            vec![7, 7],
        ];
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&rows, Device::Cpu);
        // z = mu and dropout off: everything is deterministic.
        let together = vae.forward(&batch, &batch.inputs, Pass::Eval, ZFrom::Mean);
        let mut alone_sum = 0.0;
        for (i, s) in rows.iter().enumerate() {
            let single = Batch::new(&[*s], Device::Cpu);
            let out = vae.forward(&single, &single.inputs, Pass::Eval, ZFrom::Mean);
            let a = out.rec.double_value(&[0]);
            let t = together.rec.double_value(&[i as i64]);
            assert!(
                (a - t).abs() < 1e-4,
                "sentence {i}: alone {a} vs in batch {t}"
            );
            assert!(out
                .mu
                .allclose(&together.mu.narrow(0, i as i64, 1), 1e-5, 1e-6, false));
            alone_sum += a;
        }
        let batch_sum = together.rec.sum(Kind::Double).double_value(&[]);
        assert!(
            (batch_sum - alone_sum).abs() < 1e-3,
            "{batch_sum} vs {alone_sum}"
        );
        // The output layer in blocks of tokens (evaluation, and training's fixed blocks) gives
        // the same sums, with either skip path, whether a block ends inside a sentence or not.
        for skip_hidden in [false, true] {
            let vae = Vae::new(
                nn::VarStore::new(Device::Cpu).root(),
                &ModelConfig {
                    skip_hidden,
                    ..tiny()
                },
            );
            let z = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
            let hidden = vae.decoder.hidden(&batch.inputs, &z, false);
            let nll = |rows| {
                reconstruction_nll(
                    &vae.decoder,
                    &hidden,
                    &batch.targets,
                    &batch.real,
                    &z,
                    rows,
                    Kind::Float,
                )
            };
            let whole = nll(None);
            for rows in [1, 3, 7, 17, 1000] {
                assert!(
                    whole.allclose(&nll(Some(rows)), 1e-5, 1e-5, false),
                    "rows {rows}"
                );
            }
        }
    }

    #[test]
    fn generation_step_matches_the_full_sequence_pass() {
        for skip_hidden in [false, true] {
            let _rng = crate::seeded(1);
            let vs = nn::VarStore::new(Device::Cpu);
            let vae = Vae::new(
                vs.root(),
                &ModelConfig {
                    skip_hidden,
                    ..tiny()
                },
            );
            let inputs = Tensor::from_slice(&[1i64, 5, 6, 7]).view([1, 4]);
            let z = Tensor::randn([1, 4], (Kind::Float, Device::Cpu));
            let full = vae.logits(&inputs, &z); // [1, 4, V]
            let mut state = vae.decoder.init_state(&z);
            let skip = vae.decoder.z_skip(&z);
            for t in 0..4 {
                let (logits, next) =
                    vae.decoder
                        .step(&inputs.select(1, t), &z, skip.as_ref(), &state);
                state = next;
                assert!(
                    logits.allclose(&full.select(1, t), 1e-5, 1e-5, false),
                    "step {t}, skip_hidden {skip_hidden}"
                );
            }
        }
    }
}
