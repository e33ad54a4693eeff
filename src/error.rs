//! The library's error type. Every failure a user can cause (a bad file, a bad
//! prompt, a bad option) ends up here with a message that names what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file or directory that cannot be used: truncated, corrupt,
    /// unknown architecture, missing tensor...
    #[error("{}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("the prompt has {prompt} tokens but the context holds {context} (with {reserve} reserved for generation)")]
    ContextLength {
        prompt: usize,
        context: usize,
        reserve: usize,
    },

    #[error("empty prompt: there is nothing to condition on")]
    EmptyPrompt,

    /// An invalid option or argument value.
    #[error("{0}")]
    Invalid(String),

    #[error("registry: {0}")]
    Registry(String),

    #[error("draft tree: {0}")]
    Draft(String),

    #[error("recycle state {}: {msg}", path.display())]
    RecycleState { path: PathBuf, msg: String },

    #[error("{kind} state {}: {msg}", path.display())]
    DrafterState {
        kind: &'static str,
        path: PathBuf,
        msg: String,
    },

    /// A batched forward failed; every sequence in it gets this.
    #[error("batched forward failed: {0}")]
    Batch(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
