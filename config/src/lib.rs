//! The contract both Agora planes share: the API key format and its claims, the
//! data-plane snapshot the control plane compiles and the proxy serves from, the
//! usage event schema, Langflow flow definitions, and settings loading.

pub mod connections;
pub mod flow;
pub mod keys;
pub mod settings;
pub mod snapshot;
pub mod usage;
