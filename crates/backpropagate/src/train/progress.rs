//! What a run changes as it trains — adapter, optimizer, step counters, dropout RNG,
//! data order — and where it starts from: a checkpoint, or a fresh adapter.

use std::path::{Path, PathBuf};

use candle_core::Var;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::batch::{Cursor, DataOrder};
use super::checkpoint::{self, State};
use super::optim::AdamW;
use super::prepare::Session;
use crate::error::{Error, Result};
use crate::event::{Event, EventSink, LogLevel};
use crate::lora::LoraSet;
use crate::run::RunDir;

/// Everything a checkpoint saves, so that a resumed run continues bit for bit.
pub(super) struct Progress {
    pub(super) lora: LoraSet,
    pub(super) opt: AdamW,
    pub(super) state: State,
    /// Dropout's RNG.
    pub(super) rng: ChaCha8Rng,
    pub(super) order: DataOrder,
    /// The LoRA weights twice: as the model reads them, and as the optimizer's flat
    /// host buffers that are copied back into them after each update.
    pub(super) vars: Vec<Var>,
    pub(super) params: Vec<Vec<f32>>,
    /// Smaller than planned after an out-of-memory back-off.
    pub(super) micro: usize,
}

impl Progress {
    /// Continues from `state`: the dropout RNG at its saved word position, the data
    /// order at its saved cursor, at the planned micro-batch.
    pub(super) fn new(session: &Session, lora: LoraSet, opt: AdamW, state: State) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
        rng.set_word_pos(state.rng_word_pos.parse::<u128>().unwrap_or(0));
        let order = DataOrder::new(session.train_rows.len(), session.config.seed, state.cursor);
        let vars: Vec<_> = lora
            .named_vars()
            .into_iter()
            .map(|(_, v)| v.clone())
            .collect();
        let params: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .collect::<candle_core::Result<_>>()?;
        Ok(Progress {
            lora,
            opt,
            state,
            rng,
            order,
            vars,
            params,
            micro: session.micro_batch,
        })
    }

    /// The state as it stands with the positions that live elsewhere (data cursor,
    /// RNG, optimizer step, micro-batch) copied in.
    fn snapshot(&self) -> State {
        State {
            cursor: self.order.cursor(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            optimizer_t: self.opt.t,
            micro_batch: Some(self.micro),
            ..self.state.clone()
        }
    }

    pub(super) fn save_checkpoint(&self, run: &RunDir, base_model: &str) -> Result<PathBuf> {
        checkpoint::save(
            &run.checkpoints_dir(),
            &self.snapshot(),
            &self.lora,
            &self.opt,
            base_model,
        )
    }
}

impl Session {
    /// The adapter, optimizer and state to train from: the checkpoint's, or fresh ones.
    /// Metric lines past the starting step are dropped, since the run writes them again.
    pub(super) fn load_or_init(
        &self,
        run: &RunDir,
        checkpoint: Option<&Path>,
        sink: &dyn EventSink,
    ) -> Result<(LoraSet, AdamW, State)> {
        match checkpoint {
            Some(dir) => {
                let loaded =
                    checkpoint::load(dir, &self.model_config, &self.adamw(&[]), &self.device)?;
                run.truncate_metrics_after(loaded.state.step)?;
                sink.emit(Event::Log {
                    level: LogLevel::Info,
                    message: format!("resuming from step {}", loaded.state.step),
                });
                Ok((loaded.lora, loaded.opt, loaded.state))
            }
            None => {
                run.truncate_metrics_after(0)?;
                let lora = self.initial_lora()?;
                let sizes: Vec<usize> = lora
                    .named_vars()
                    .iter()
                    .map(|(_, v)| v.elem_count())
                    .collect();
                let opt = self.adamw(&sizes);
                let state = State {
                    step: 0,
                    cursor: Cursor { epoch: 0, pos: 0 },
                    // Its own stream: the adapter's initialisation draws from `seed`.
                    rng_seed: self.config.seed.wrapping_add(1),
                    rng_word_pos: "0".into(),
                    optimizer_t: 0,
                    tokens_seen: 0,
                    elapsed_s: 0.0,
                    micro_batch: None,
                };
                Ok((lora, opt, state))
            }
        }
    }

    /// The `init_adapter` to continue training, or a new adapter seeded from `seed`.
    fn initial_lora(&self) -> Result<LoraSet> {
        let c = &self.config;
        Ok(match &c.init_adapter {
            Some(dir) => {
                let lora = LoraSet::load_peft(dir, &self.model_config, &self.device)?;
                if lora.config.r != c.lora.r || lora.config.target_modules != c.lora.target_modules
                {
                    return Err(Error::Run {
                        path: dir.clone(),
                        message: "the initial adapter's rank or target modules differ from this run's LoRA settings".into(),
                    });
                }
                lora
            }
            None => {
                let mut init_rng = ChaCha8Rng::seed_from_u64(c.seed);
                LoraSet::init(&self.model_config, &c.lora, &mut init_rng, &self.device)?
            }
        })
    }

    /// An AdamW with this run's settings and zeroed moments of `sizes`.
    fn adamw(&self, sizes: &[usize]) -> AdamW {
        let o = &self.config.optimizer;
        AdamW::new(sizes, o.beta1, o.beta2, o.eps, o.weight_decay)
    }
}
