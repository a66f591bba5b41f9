//! Revocations and halts: the operator's fast cut-offs. Kept in memory as an index the hot path reads
//! without locks, persisted in a file (one instance) or in Redis with pub/sub (replicas share it).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::StateConfig;
use crate::metrics::Metrics;
use crate::policy::Jurisdiction;
use crate::token::{Principal, now_secs};

/// What a revocation matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeBy {
    Jti,
    Sub,
    ClientId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub id: String,
    pub by: RevokeBy,
    pub value: String,
    /// The issuer's config name; `None` matches every issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Unix seconds after which the revocation no longer applies (a revoked token has expired by then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a halt stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaltBy {
    Jurisdiction,
    Route,
    Issuer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub id: String,
    pub by: HaltBy,
    pub value: String,
    pub reason: String,
    pub created_at: u64,
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entries {
    #[serde(default)]
    pub revocations: Vec<Revocation>,
    #[serde(default)]
    pub halts: Vec<Halt>,
}

/// The entries arranged for the per-request checks.
#[derive(Default)]
struct Index {
    entries: Entries,
    halted_jurisdictions: Vec<Jurisdiction>,
    halted_routes: HashSet<String>,
    halted_issuers: HashSet<String>,
}

impl Index {
    fn new(entries: Entries) -> Index {
        let mut idx = Index::default();
        for h in &entries.halts {
            match h.by {
                HaltBy::Jurisdiction => idx.halted_jurisdictions.extend(Jurisdiction::parse(&h.value)),
                HaltBy::Route => {
                    idx.halted_routes.insert(h.value.clone());
                }
                HaltBy::Issuer => {
                    idx.halted_issuers.insert(h.value.clone());
                }
            }
        }
        idx.entries = entries;
        idx
    }
}

/// Why an admin change was not made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the shared state store is unreachable; the change was not made")]
    Unavailable,
    #[error("cannot write the state file: {0}")]
    Io(String),
}

enum Backend {
    File { path: PathBuf },
    Redis(Box<RedisStore>),
}

pub struct State {
    index: ArcSwap<Index>,
    backend: Backend,
    /// Serialises admin changes so a read-modify-write never loses another change.
    write: Mutex<()>,
    /// False while the shared store is out of reach (or before its first load).
    healthy: Arc<AtomicBool>,
    /// False until the entries were loaded once: until then nothing can be checked, so nothing passes.
    loaded: AtomicBool,
    /// The Redis version of the installed entries: a reload that raced with a newer one never installs
    /// an older snapshot over it.
    version: std::sync::Mutex<u64>,
    metrics: Metrics,
}

impl State {
    /// Opens the store. A state file that exists but cannot be read or parsed stops the start:
    /// revocations are never dropped silently.
    pub async fn open(config: &StateConfig, metrics: &Metrics) -> Result<Arc<State>, String> {
        let (backend, entries, healthy) = match config {
            StateConfig::File(path) => (Backend::File { path: path.clone() }, read_file(path)?, true),
            StateConfig::Redis { url, prefix } => {
                let store = RedisStore::new(url, prefix)?;
                (Backend::Redis(Box::new(store)), Entries::default(), false)
            }
        };
        let state = Arc::new(State {
            index: ArcSwap::from_pointee(Index::new(entries)),
            backend,
            write: Mutex::new(()),
            healthy: Arc::new(AtomicBool::new(healthy)),
            loaded: AtomicBool::new(healthy),
            version: std::sync::Mutex::new(0),
            metrics: metrics.clone(),
        });
        state.update_gauges();
        if let Backend::Redis(store) = &state.backend {
            // The first load is awaited briefly so a replica that starts next to a healthy Redis enforces the
            // shared set from its first request.
            if let Ok((version, entries)) = store.load().await {
                state.install_version(version, entries, true);
                state.healthy.store(true, Ordering::SeqCst);
            }
            tokio::spawn(watch(Arc::downgrade(&state)));
        }
        Ok(state)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// The first revocation matching `p`, if any.
    pub fn revoked(&self, p: &Principal) -> Option<String> {
        let idx = self.index.load();
        if idx.entries.revocations.is_empty() {
            return None;
        }
        let now = now_secs();
        idx.entries
            .revocations
            .iter()
            .find(|r| {
                let field = match r.by {
                    RevokeBy::Jti => &p.jti,
                    RevokeBy::Sub => &p.sub,
                    RevokeBy::ClientId => &p.client_id,
                };
                field.as_deref() == Some(r.value.as_str())
                    && r.issuer.as_deref().is_none_or(|i| i == &*p.issuer)
                    && r.expires_at.is_none_or(|e| e > now)
            })
            .map(|r| r.id.clone())
    }

    /// True when a halt covers this route, its jurisdiction (a halted country covers its subdivisions)
    /// or the token's issuer.
    pub fn halted(&self, route: &str, jurisdiction: &Jurisdiction, issuer: &str) -> bool {
        let idx = self.index.load();
        if idx.entries.halts.is_empty() {
            return false;
        }
        idx.halted_routes.contains(route)
            || idx.halted_issuers.contains(issuer)
            || idx.halted_jurisdictions.iter().any(|h| h.covers(jurisdiction))
    }

    pub fn entries(&self) -> Entries {
        self.index.load().entries.clone()
    }

    /// Applies `change` to the entries and stores the result before returning.
    pub async fn change(&self, change: impl FnOnce(&mut Entries) -> bool) -> Result<bool, StoreError> {
        let _guard = self.write.lock().await;
        match &self.backend {
            Backend::File { path } => {
                let mut entries = self.entries();
                let now = now_secs();
                entries.revocations.retain(|r| r.expires_at.is_none_or(|e| e > now));
                if !change(&mut entries) {
                    return Ok(false);
                }
                write_file(path, &entries).await?;
                self.install(entries);
                Ok(true)
            }
            Backend::Redis(store) => {
                if !self.healthy() {
                    return Err(StoreError::Unavailable);
                }
                let (_, before) = store.load().await.map_err(|_| StoreError::Unavailable)?;
                let mut after = before.clone();
                if !change(&mut after) {
                    return Ok(false);
                }
                store.apply(&before, &after).await.map_err(|_| StoreError::Unavailable)?;
                // Read back rather than install `after`: another replica may have written meanwhile.
                let (version, entries) = store.load().await.map_err(|_| StoreError::Unavailable)?;
                self.install_version(version, entries, false);
                Ok(true)
            }
        }
    }

    /// `fresh`: the first load on a new connection, which may find a Redis that restarted empty and
    /// so an older version; it is installed whatever its version.
    fn install_version(&self, version: u64, entries: Entries, fresh: bool) {
        let mut current = self.version.lock().unwrap_or_else(|e| e.into_inner());
        if fresh || version >= *current {
            *current = version;
            self.install(entries);
        }
    }

    fn install(&self, entries: Entries) {
        self.index.store(Arc::new(Index::new(entries)));
        self.loaded.store(true, Ordering::Relaxed);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let idx = self.index.load();
        self.metrics
            .state_entries
            .with_label_values(&["revocations"])
            .set(idx.entries.revocations.len() as i64);
        self.metrics.state_entries.with_label_values(&["halts"]).set(idx.entries.halts.len() as i64);
    }
}

/// A fresh id for an entry: 16 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    // The system RNG failing is not something to recover from; fall back to the clock so ids stay unique.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        b = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64)
            .to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_file(path: &Path) -> Result<Entries, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!("state file {} cannot be parsed ({e}); refusing to start without it", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Entries::default()),
        Err(e) => {
            Err(format!("state file {} cannot be read ({e}); refusing to start without it", path.display()))
        }
    }
}

/// Temporary file, fsync, rename, fsync of the directory: a crash leaves the old or the new file, never half.
async fn write_file(path: &Path, entries: &Entries) -> Result<(), StoreError> {
    let path = path.to_path_buf();
    let bytes = serde_json::to_vec_pretty(entries).map_err(|e| StoreError::Io(e.to_string()))?;
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension(format!("tmp-{}", new_id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(|e| StoreError::Io(e.to_string()))?
    .map_err(|e| StoreError::Io(e.to_string()))
}

// ---------------------------------------------------------------------------------------------------------
// Redis: one hash per kind (id -> JSON entry) and a channel that announces every change.

struct RedisStore {
    client: redis::Client,
    revocations_key: String,
    halts_key: String,
    version_key: String,
    channel: String,
}

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisStore {
    fn new(url: &str, prefix: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("state.url: {e}"))?;
        Ok(RedisStore {
            client,
            revocations_key: format!("{prefix}:revocations"),
            halts_key: format!("{prefix}:halts"),
            version_key: format!("{prefix}:version"),
            channel: format!("{prefix}:changes"),
        })
    }

    async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let fut = self.client.get_multiplexed_async_connection();
        tokio::time::timeout(REDIS_TIMEOUT, fut)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))?
    }

    /// One consistent snapshot: both hashes and the version, read in one transaction.
    async fn load(&self) -> redis::RedisResult<(u64, Entries)> {
        let mut c = self.conn().await?;
        let work = async {
            type Snapshot = (Vec<(String, String)>, Vec<(String, String)>, Option<u64>);
            let (revs, halts, version): Snapshot = redis::pipe()
                .atomic()
                .cmd("HGETALL")
                .arg(&self.revocations_key)
                .cmd("HGETALL")
                .arg(&self.halts_key)
                .cmd("GET")
                .arg(&self.version_key)
                .query_async(&mut c)
                .await?;
            let mut e = Entries {
                // An entry another version wrote in a shape this one cannot read is skipped, not fatal.
                revocations: revs.iter().filter_map(|(_, v)| serde_json::from_str(v).ok()).collect(),
                halts: halts.iter().filter_map(|(_, v)| serde_json::from_str(v).ok()).collect(),
            };
            e.revocations.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            e.halts.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            Ok((version.unwrap_or(0), e))
        };
        tokio::time::timeout(REDIS_TIMEOUT, work)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))?
    }

    /// Writes the difference between `before` and `after` in one transaction, then announces it.
    async fn apply(&self, before: &Entries, after: &Entries) -> redis::RedisResult<()> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        diff(&mut pipe, &self.revocations_key, &before.revocations, &after.revocations, |r| &r.id);
        diff(&mut pipe, &self.halts_key, &before.halts, &after.halts, |h| &h.id);
        pipe.cmd("INCR").arg(&self.version_key).ignore();
        pipe.cmd("PUBLISH").arg(&self.channel).arg("changed").ignore();
        let work = pipe.query_async::<()>(&mut c);
        tokio::time::timeout(REDIS_TIMEOUT, work)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))?
    }
}

fn diff<T: Serialize + PartialEq>(
    pipe: &mut redis::Pipeline,
    key: &str,
    before: &[T],
    after: &[T],
    id: impl Fn(&T) -> &String,
) {
    for old in before {
        if !after.iter().any(|n| id(n) == id(old)) {
            pipe.cmd("HDEL").arg(key).arg(id(old)).ignore();
        }
    }
    for new in after {
        if !before.contains(new) {
            let json = serde_json::to_string(new).unwrap_or_default();
            pipe.cmd("HSET").arg(key).arg(id(new)).arg(json).ignore();
        }
    }
}

/// Follows the change channel: every announcement, and every reconnect, reloads the full set. While
/// Redis is out of reach the last known set keeps being enforced and the replica reports not ready.
async fn watch(state: std::sync::Weak<State>) {
    use futures_util::StreamExt;
    loop {
        let Some(s) = state.upgrade() else { return };
        let Backend::Redis(store) = &s.backend else { return };
        let client = store.client.clone();
        let channel = store.channel.clone();
        drop(s);
        let pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = pubsub
            && pubsub.subscribe(&channel).await.is_ok()
        {
            if reload(&state, true).await.is_none() {
                return;
            }
            let mut messages = pubsub.into_on_message();
            // A message, or a quiet interval to re-check the connection with a full reload.
            while let Ok(Some(_)) | Err(_) =
                tokio::time::timeout(Duration::from_secs(5), messages.next()).await
            {
                if reload(&state, false).await != Some(true) {
                    break;
                }
            }
        }
        match state.upgrade() {
            Some(s) => {
                if s.healthy.swap(false, Ordering::SeqCst) {
                    tracing::warn!("state store unreachable: enforcing the last known revocations and halts");
                }
            }
            None => return,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `None` when the state is gone; otherwise whether the reload worked.
async fn reload(state: &std::sync::Weak<State>, fresh: bool) -> Option<bool> {
    let s = state.upgrade()?;
    let Backend::Redis(store) = &s.backend else { return Some(false) };
    match store.load().await {
        Ok((version, entries)) => {
            s.install_version(version, entries, fresh);
            if !s.healthy.swap(true, Ordering::SeqCst) {
                tracing::info!("state store reachable: shared revocations and halts loaded");
            }
            Some(true)
        }
        Err(_) => Some(false),
    }
}
