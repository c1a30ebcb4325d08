//! What a rollout coordinator must not forget, and where it keeps it.
//!
//! A coordinator restarted in the middle of a rollout must resume where it
//! was: the rollout's phase, who has precommitted, which version is
//! current. [`CoordState`] is that memory; a [`StateStore`] keeps it:
//!
//! - [`RedbState`] (the default): one embedded [redb] file. Each save is one
//!   ACID write transaction, durable when `save` returns; a crash leaves the
//!   previous state or the new one, never a mix. One process at a time
//!   opens a file (redb locks it).
//! - [`RedisState`], for high availability: several coordinators share one
//!   Redis server and a [`LeaderLease`]. Only the holder of the lease may
//!   save (the check and the write are one Lua script, so a coordinator that
//!   lost its lease while paused cannot overwrite its successor's state);
//!   a standby that finds the lease expired takes it, loads the state and
//!   carries on. The lease lives `ttl`; the leader renews it well before.
//!
//! [redb]: https://docs.rs/redb

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{HotweightsError, Result};
use crate::rollout::Rollout;

/// The coordinator's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordState {
    /// Bumped by every save: a larger one is newer.
    pub revision: u64,
    /// The version every worker runs, once a rollout committed it.
    pub current_version: Option<String>,
    /// The rollouts kept (the active one and the most recent ended ones,
    /// see [`KEEP_ENDED`]), by plan id.
    pub rollouts: BTreeMap<String, Rollout>,
    /// The rollout in progress, if any.
    pub active: Option<String>,
    /// Plan ids in the order they were submitted: which ended rollouts
    /// are the oldest.
    #[serde(default)]
    pub order: Vec<String>,
}

/// Ended rollouts kept in the state (every save writes the whole state, so
/// it must not grow with every rollout); older ones are forgotten, and
/// submitting their plan id again is a new rollout.
pub const KEEP_ENDED: usize = 64;

impl CoordState {
    /// Forgets the oldest ended rollouts beyond [`KEEP_ENDED`].
    pub fn prune(&mut self) {
        let ended: Vec<String> = self
            .order
            .iter()
            .filter(|p| {
                self.rollouts
                    .get(*p)
                    .is_some_and(|r| r.phase().is_terminal())
            })
            .cloned()
            .collect();
        let excess = ended.len().saturating_sub(KEEP_ENDED);
        for p in ended.into_iter().take(excess) {
            self.rollouts.remove(&p);
            self.order.retain(|o| *o != p);
        }
    }
}

/// Where a coordinator keeps its [`CoordState`].
pub trait StateStore: Send {
    /// The last saved state, or `None` for a new store.
    fn load(&mut self) -> Result<Option<CoordState>>;
    /// Saves `state` durably, bumping its revision.
    fn save(&mut self, state: &mut CoordState) -> Result<()>;
    /// Where the state lives, for messages.
    fn describe(&self) -> String;
    /// Saves a named blob (a submitted plan, the current manifest) durably,
    /// apart from the state: plans are large and never change once saved.
    fn put_blob(&mut self, name: &str, bytes: &[u8]) -> Result<()>;
    /// A blob saved by [`put_blob`](Self::put_blob), or `None`.
    fn get_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>>;
}

impl StateStore for Box<dyn StateStore> {
    fn load(&mut self) -> Result<Option<CoordState>> {
        (**self).load()
    }
    fn save(&mut self, state: &mut CoordState) -> Result<()> {
        (**self).save(state)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn put_blob(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        (**self).put_blob(name, bytes)
    }
    fn get_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        (**self).get_blob(name)
    }
}

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("coordinator");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const STATE_KEY: &str = "state";

/// The state in one redb file.
pub struct RedbState {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbState")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbState {
    /// Opens (or creates) the state file at `path`. Fails when another
    /// process has it open.
    pub fn open(path: &Path) -> Result<RedbState> {
        let db = Database::create(path).map_err(|e| store_err(path, format!("opening: {e}")))?;
        Ok(RedbState {
            db,
            path: path.to_owned(),
        })
    }
}

fn store_err(path: &Path, message: String) -> HotweightsError {
    HotweightsError::Store {
        path: path.to_owned(),
        message,
    }
}

fn decode(bytes: &[u8], origin: &str) -> Result<CoordState> {
    serde_json::from_slice(bytes).map_err(|e| {
        HotweightsError::Mismatch(format!(
            "{origin}: the saved coordinator state does not decode: {e}"
        ))
    })
}

impl StateStore for RedbState {
    fn load(&mut self) -> Result<Option<CoordState>> {
        let fail = |e: String| store_err(&self.path, format!("reading the state: {e}"));
        let txn = self.db.begin_read().map_err(|e| fail(e.to_string()))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(fail(e.to_string())),
        };
        let Some(value) = table.get(STATE_KEY).map_err(|e| fail(e.to_string()))? else {
            return Ok(None);
        };
        decode(value.value(), &self.path.display().to_string()).map(Some)
    }

    fn save(&mut self, state: &mut CoordState) -> Result<()> {
        let fail = |e: String| store_err(&self.path, format!("saving the state: {e}"));
        let mut next = state.clone();
        next.revision += 1;
        let bytes = serde_json::to_vec(&next).map_err(|e| fail(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| fail(e.to_string()))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| fail(e.to_string()))?;
            table
                .insert(STATE_KEY, bytes.as_slice())
                .map_err(|e| fail(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail(e.to_string()))?;
        // Only once durable does the caller's copy say so.
        state.revision = next.revision;
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn put_blob(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let fail = |e: String| store_err(&self.path, format!("saving {name}: {e}"));
        let txn = self.db.begin_write().map_err(|e| fail(e.to_string()))?;
        {
            let mut table = txn.open_table(BLOBS).map_err(|e| fail(e.to_string()))?;
            table.insert(name, bytes).map_err(|e| fail(e.to_string()))?;
        }
        txn.commit().map_err(|e| fail(e.to_string()))
    }

    fn get_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let fail = |e: String| store_err(&self.path, format!("reading {name}: {e}"));
        let txn = self.db.begin_read().map_err(|e| fail(e.to_string()))?;
        let table = match txn.open_table(BLOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(fail(e.to_string())),
        };
        let value = table.get(name).map_err(|e| fail(e.to_string()))?;
        Ok(value.map(|v| v.value().to_vec()))
    }
}

/// A lease in Redis that names one leader among several coordinators.
///
/// The lease is one key holding the leader's id, with an expiry. Taking it
/// is `SET NX PX`; renewing and releasing check the holder first (a Lua
/// script, atomic on the server), so a coordinator can only ever extend or
/// drop its own lease.
#[derive(Clone)]
pub struct LeaderLease {
    client: redis::Client,
    /// The server's URL without its password.
    shown: String,
    key: String,
    holder: String,
    ttl: Duration,
}

impl std::fmt::Debug for LeaderLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderLease")
            .field("key", &self.key)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish()
    }
}

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Writes the state only while the lease names the writer.
const FENCED_SET: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// A Redis URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl LeaderLease {
    /// A lease named `name` on the Redis server at `url`, for the
    /// coordinator `holder`, lasting `ttl` unless renewed.
    pub fn new(url: &str, name: &str, holder: &str, ttl: Duration) -> Result<LeaderLease> {
        let client = redis::Client::open(url)
            .map_err(|e| HotweightsError::Option(format!("redis URL {}: {e}", redact(url))))?;
        Ok(LeaderLease {
            client,
            shown: redact(url),
            key: format!("hotweights:{name}:leader"),
            holder: holder.to_owned(),
            ttl,
        })
    }

    fn fail(&self, e: redis::RedisError) -> HotweightsError {
        HotweightsError::Mismatch(format!("leader lease {} at {}: {e}", self.key, self.shown))
    }

    fn connection(&self) -> Result<redis::Connection> {
        self.client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| self.fail(e))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
    }

    /// Takes the lease if no one holds it; says whether this coordinator
    /// now leads (also when it already did).
    pub fn try_acquire(&self) -> Result<bool> {
        let mut con = self.connection()?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(&self.holder)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms())
            .query(&mut con)
            .map_err(|e| self.fail(e))?;
        if set.is_some() {
            return Ok(true);
        }
        self.renew_on(&mut con)
    }

    /// Extends the lease if this coordinator holds it; `false` when it
    /// has lost it (it must stop acting as leader at once).
    pub fn renew(&self) -> Result<bool> {
        let mut con = self.connection()?;
        self.renew_on(&mut con)
    }

    fn renew_on(&self, con: &mut redis::Connection) -> Result<bool> {
        let renewed: i64 = redis::cmd("EVAL")
            .arg(RENEW)
            .arg(1)
            .arg(&self.key)
            .arg(&self.holder)
            .arg(self.ttl_ms())
            .query(con)
            .map_err(|e| self.fail(e))?;
        Ok(renewed == 1)
    }

    /// Gives the lease up, if held, so a standby takes over at once.
    pub fn release(&self) -> Result<bool> {
        let mut con = self.connection()?;
        let released: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.holder)
            .query(&mut con)
            .map_err(|e| self.fail(e))?;
        Ok(released == 1)
    }

    /// Who holds the lease now.
    pub fn holder(&self) -> Result<Option<String>> {
        let mut con = self.connection()?;
        redis::cmd("GET")
            .arg(&self.key)
            .query(&mut con)
            .map_err(|e| self.fail(e))
    }

    /// This coordinator's id.
    pub fn id(&self) -> &str {
        &self.holder
    }
}

/// The state in Redis, written only by the lease's holder.
#[derive(Debug)]
pub struct RedisState {
    lease: LeaderLease,
    state_key: String,
}

impl RedisState {
    /// The state of the coordinators sharing `lease`'s name.
    pub fn new(lease: LeaderLease) -> RedisState {
        let state_key = lease.key.replace(":leader", ":state");
        RedisState { lease, state_key }
    }

    /// The lease (to acquire and renew it).
    pub fn lease(&self) -> &LeaderLease {
        &self.lease
    }
}

impl StateStore for RedisState {
    fn load(&mut self) -> Result<Option<CoordState>> {
        let mut con = self.lease.connection()?;
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.state_key)
            .query(&mut con)
            .map_err(|e| self.lease.fail(e))?;
        bytes.map(|b| decode(&b, &self.state_key)).transpose()
    }

    /// Saves, if this coordinator holds the lease; otherwise fails and
    /// writes nothing (another coordinator leads now).
    fn save(&mut self, state: &mut CoordState) -> Result<()> {
        let mut next = state.clone();
        next.revision += 1;
        let bytes = serde_json::to_vec(&next)
            .map_err(|e| HotweightsError::Mismatch(format!("encoding the state: {e}")))?;
        let mut con = self.lease.connection()?;
        let written: i64 = redis::cmd("EVAL")
            .arg(FENCED_SET)
            .arg(2)
            .arg(&self.lease.key)
            .arg(&self.state_key)
            .arg(&self.lease.holder)
            .arg(bytes)
            .query(&mut con)
            .map_err(|e| self.lease.fail(e))?;
        if written != 1 {
            return Err(HotweightsError::Mismatch(format!(
                "coordinator {} does not hold the leader lease {}: not saving; another \
                 coordinator leads now",
                self.lease.holder, self.lease.key
            )));
        }
        state.revision = next.revision;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("redis key {}", self.state_key)
    }

    /// Fenced like the state: only the leader writes.
    fn put_blob(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let key = self.state_key.replace(":state", &format!(":blob:{name}"));
        let mut con = self.lease.connection()?;
        let written: i64 = redis::cmd("EVAL")
            .arg(FENCED_SET)
            .arg(2)
            .arg(&self.lease.key)
            .arg(&key)
            .arg(&self.lease.holder)
            .arg(bytes)
            .query(&mut con)
            .map_err(|e| self.lease.fail(e))?;
        if written != 1 {
            return Err(HotweightsError::Mismatch(format!(
                "coordinator {} does not hold the leader lease {}: not saving {name}",
                self.lease.holder, self.lease.key
            )));
        }
        Ok(())
    }

    fn get_blob(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.state_key.replace(":state", &format!(":blob:{name}"));
        let mut con = self.lease.connection()?;
        redis::cmd("GET")
            .arg(&key)
            .query(&mut con)
            .map_err(|e| self.lease.fail(e))
    }
}
