//! kkm-bridge: bridges the exchange methods of «Штрих-М: Кассир 5» — an exchange directory,
//! an FTP server (`.$n` names) and the HTTP service KKMTransfer — with back offices.
//!
//! The module map:
//! - [`config`]: TOML → typed config; every error names file, key and reason.
//! - [`package`]: what moves (spr/flr/rep), its file names, the base64/ZIP codec.
//! - [`stream_codec`]: the same codec a piece at a time, for packages too big for memory.
//! - [`store`]: the durable store: SQLite journal + payload spool, the commit points.
//! - [`endpoint`]: one module per exchange method (dir, ftp, http server, http client).
//! - [`pump`]: moves packages source → store → sink, per till, in order.
//! - [`watch`]: the daemon's wake-ups (filesystem events, timers, reports, shutdown).
//! - [`status`]: the per-till view: `/status` page, `/metrics`, `kkm-bridge status`.
//! - [`journal`]: journal queries (`kkm-bridge journal`), ISO-8601 dates.
//! - [`check`]: `kkm-bridge check`: reach every endpoint once.
//! - [`cli`]: the subcommands and their exit codes.
//! - [`sim`]: a back office and a till simulator, for trying the bridge and for tests.
//! - [`failpoint`]: crash points the crash tests use.
//! - [`tls`]: rustls configs for FTPS (client) and HTTPS (server).

pub mod check;
pub mod cli;
pub mod config;
pub mod endpoint;
pub mod failpoint;
pub mod journal;
pub mod package;
pub mod pump;
pub mod sim;
pub mod status;
pub mod store;
pub mod stream_codec;
pub mod tls;
pub mod watch;
