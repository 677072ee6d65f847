//! A stand-in Kubernetes API server. No real kube-apiserver can be installed on these machines,
//! so Kubernetes mode is tested against this: HTTPS with a kubeconfig and a bearer token, the
//! real URL scheme and object JSON, discovery documents that kubectl and kube-rs read, get, list,
//! create, update, merge patch and delete, watches that resume from a resourceVersion with
//! bookmarks, label and field selectors, TokenReview, and on demand a 410 Gone (compaction), a
//! cut of every open watch, or the whole server down.
//!
//! What it does not do: admission, validation against schemas, RBAC, finalizers, graceful
//! deletion, server-side apply, strategic merge of lists (patches are merge patches), protobuf,
//! or pagination (a list returns everything).

mod resources;
mod selector;
mod serve;
mod store;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use resources::{RESOURCES, Resource};
use serve::Shared;
pub use serve::TokenInfo;
pub use store::ApiError;
use store::Store;

/// A running (or stopped) stand-in API server. The objects outlive [`ApiServer::stop`], so a
/// test can take the server away and bring it back with the same state.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    running: Option<Running>,
    bind: Bind,
}

#[derive(Debug)]
struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Binds the server's address again (in the right network namespace) after a stop.
#[derive(Clone)]
struct Bind(Arc<dyn Fn() -> Result<std::net::TcpListener> + Send + Sync>);

impl std::fmt::Debug for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bind")
    }
}

impl ApiServer {
    /// Starts a server on the listener `bind` returns, writing its CA certificate and a
    /// kubeconfig (admin token) into `dir`.
    pub fn start(
        dir: &Path,
        bind: impl Fn() -> Result<std::net::TcpListener> + Send + Sync + 'static,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let listener = bind()?;
        let addr = listener.local_addr()?;
        let (tls, ca_pem) = server_tls(addr)?;
        let ca = dir.join("apiserver-ca.pem");
        std::fs::write(&ca, ca_pem)?;
        let admin_token = format!("admin-{:016x}", fastrand::u64(..));
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(addr, &ca, &admin_token))?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            admin_token,
            tokens: Mutex::new(Default::default()),
            cut: watch::channel(0).0,
            bookmark_every: Duration::from_secs(1),
        });
        let mut s = Self {
            shared,
            addr,
            kubeconfig,
            tls: Arc::new(tls),
            running: None,
            bind: Bind(Arc::new(bind)),
        };
        s.run(listener)?;
        Ok(s)
    }

    fn run(&mut self, listener: std::net::TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let shared = self.shared.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let (tcp, _) = tokio::select! {
                            _ = &mut stop => return,
                            a = listener.accept() => match a {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                        };
                        let acceptor = acceptor.clone();
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |req| {
                                serve::handle(shared.clone(), req)
                            });
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tls), svc)
                                    .await;
                        });
                    }
                });
                // Dropping the runtime ends every connection and watch: the server is gone.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        self.running = Some(Running { shutdown, thread });
        Ok(())
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig (admin) for kubectl and for agents.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Takes the server away: connections and watches end, new ones are refused. Objects stay.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown.send(());
            let _ = r.thread.join();
        }
    }

    /// Brings a stopped server back on the same address with the same objects.
    pub fn restart(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = (self.bind.0)()?;
        if listener.local_addr()? != self.addr {
            bail!("the API server came back on another address");
        }
        self.run(listener)
    }

    /// Makes every resourceVersion before now answer 410 Gone, as etcd compaction does.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// Ends every open watch mid-stream (the client sees the response end).
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Lets `token` call the API and makes TokenReview answer for it.
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.shared.tokens.lock().insert(token.to_string(), info);
    }

    fn resource(obj: &Value) -> Result<&'static Resource> {
        let v = obj["apiVersion"].as_str().unwrap_or_default();
        let k = obj["kind"].as_str().unwrap_or_default();
        resources::by_kind(v, k).ok_or_else(|| anyhow!("the stand-in does not serve {v}/{k}"))
    }

    /// Creates an object directly (for state too large to send through kubectl).
    pub fn create(&self, obj: Value) -> Result<Value> {
        let r = Self::resource(&obj)?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        self.shared
            .store
            .lock()
            .create(r, &ns, obj)
            .map_err(|e| anyhow!("{}", e.message))
    }

    /// Creates or replaces an object directly.
    pub fn put(&self, obj: Value) -> Result<Value> {
        let r = Self::resource(&obj)?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .context("the object has no name")?
            .to_string();
        let mut store = self.shared.store.lock();
        let result = if store.get(r, &ns, &name).is_ok() {
            let mut obj = obj;
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            store.update(r, &ns, &name, obj)
        } else {
            store.create(r, &ns, obj)
        };
        result.map_err(|e| anyhow!("{}", e.message))
    }

    /// Reads an object directly.
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Result<Value> {
        let r = resources::by_kind(api_version, kind)
            .ok_or_else(|| anyhow!("the stand-in does not serve {api_version}/{kind}"))?;
        self.shared
            .store
            .lock()
            .get(r, ns, name)
            .map_err(|e| anyhow!("{}", e.message))
    }

    /// Deletes an object directly.
    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Result<()> {
        let r = resources::by_kind(api_version, kind)
            .ok_or_else(|| anyhow!("the stand-in does not serve {api_version}/{kind}"))?;
        self.shared
            .store
            .lock()
            .delete(r, ns, name)
            .map(|_| ())
            .map_err(|e| anyhow!("{}", e.message))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kubeconfig_text(addr: SocketAddr, ca: &Path, token: &str) -> String {
    let host = match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": format!("https://{host}"), "certificate-authority": ca}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "admin", "namespace": "default"}}],
        "current-context": "standin",
    });
    serde_yaml_ng::to_string(&config).unwrap_or_default()
}

/// A CA and a server certificate for `addr`, as rustls serves it.
fn server_tls(addr: SocketAddr) -> Result<(rustls::ServerConfig, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh stand-in API server CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["kubernetes.default.svc".to_string()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(addr.ip()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key)?;
    let cert = params.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, ca.pem()))
}

/// Runs kubectl against a stand-in API server, with its own discovery cache.
#[derive(Debug, Clone)]
pub struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    /// A network namespace to run it in (where the server is reachable), if not this one.
    netns: Option<PathBuf>,
}

impl Kubectl {
    /// kubectl for `api`, run in `netns` when given.
    pub fn new(api: &ApiServer, netns: Option<PathBuf>) -> Self {
        let kubeconfig = api.kubeconfig().to_path_buf();
        let cache = kubeconfig.with_file_name("kubectl-cache");
        Self {
            kubeconfig,
            cache,
            netns,
        }
    }

    /// Runs `kubectl args` with `stdin`; fails with kubectl's own words when it fails.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--request-timeout=10s")
            .args(args)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut run = || -> Result<std::process::Output> {
            let mut child = cmd
                .spawn()
                .context("kubectl (install it: see the README)")?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                std::io::Write::write_all(&mut pipe, text.as_bytes())?;
            }
            Ok(child.wait_with_output()?)
        };
        let out = match &self.netns {
            Some(ns) => crate::in_netns(ns, &mut run)??,
            None => run()?,
        };
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl create -f -` of `yaml` (objects as users write them).
    pub fn create(&self, yaml: &str) -> Result<String> {
        self.run(&["create", "--validate=false", "-f", "-"], Some(yaml))
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.run(&all, None)?)?)
    }
}
