//! Test harness: the real nginx binary with the module loaded, on run-time ports, and real
//! WebSocket peers (tokio-tungstenite) on 127.0.0.1.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// The nginx binary: `NGX_WS_NGINX`, or the one nginx-sys built for this crate.
pub fn nginx_bin() -> PathBuf {
    match std::env::var_os("NGX_WS_NGINX") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("NGX_WS_NGINX_BUILD_DIR")).join("nginx"),
    }
}

/// The module: `NGX_WS_MODULE`, or the cdylib cargo built next to this test binary.
pub fn module_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NGX_WS_MODULE") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // cargo test builds the cdylib into target/<profile>/deps, next to this binary; only
    // cargo build copies it up to target/<profile>.
    let deps = exe.parent().expect("deps dir");
    let fresh = deps.join("libnginx_ws.so");
    if fresh.exists() {
        return fresh;
    }
    deps.parent().expect("target dir").join("libnginx_ws.so")
}

/// A free TCP port on 127.0.0.1, picked at run time.
pub fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A full nginx.conf around an `http {}` body.
pub fn main_conf(workers: u32, http_body: &str) -> String {
    format!(
        "load_module {module};\n\
         daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         error_log logs/error.log info;\npid logs/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n{http_body}\n}}\n",
        module = module_path().display(),
    )
}

/// A running nginx with its own prefix directory.
pub struct Nginx {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
}

impl Nginx {
    /// Writes `conf` (which must listen on `port`) and starts nginx, waiting for the port.
    pub fn start_conf(conf: &str, port: u16) -> Nginx {
        start_with_files(conf, port, &[])
    }

    /// Starts nginx in a prefix directory the test prepared.
    pub fn spawn_in(dir: tempfile::TempDir, conf: &str, port: u16) -> Nginx {
        Nginx::spawn(dir, conf, port)
    }

    fn spawn(dir: tempfile::TempDir, conf: &str, port: u16) -> Nginx {
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        std::fs::write(dir.path().join("nginx.conf"), conf).expect("write conf");
        // NGX_WS_NGINX_WRAPPER runs nginx under a tool, e.g. "valgrind --log-file=...".
        let wrapper = std::env::var("NGX_WS_NGINX_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(nginx_bin());
                c
            }
            None => Command::new(nginx_bin()),
        };
        let child = cmd
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nginx");
        let mut n = Nginx {
            dir,
            child: Some(child),
            port,
        };
        n.wait_listening();
        n
    }

    /// Starts nginx with one `server` on a fresh port; `{port}` in `server_body` is not needed.
    pub fn start(workers: u32, http_extra: &str, server_body: &str) -> Nginx {
        let port = free_port();
        let body = format!(
            "{http_extra}\n  server {{\n    listen 127.0.0.1:{port};\n{server_body}\n  }}\n"
        );
        Nginx::start_conf(&main_conf(workers, &body), port)
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!(
                        "nginx exited ({status}): {err}\nerror.log:\n{}",
                        self.read("logs/error.log")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// The JSON records of a log file.
    pub fn records(&self, rel: &str) -> Vec<Value> {
        let text = self.read(rel);
        // A line nginx is still writing (no newline yet) is not a record yet.
        let whole = text.rfind('\n').map_or("", |i| &text[..i]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    /// Waits until `pred` holds for the records of `rel`, and returns them.
    pub async fn wait_records(&self, rel: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let recs = self.records(rel);
            if pred(&recs) {
                return recs;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for records in {rel}: {recs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the file has at least `n` lines and returns them.
    pub async fn wait_lines(&self, rel: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.read(rel);
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} lines in {rel}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn master_pid(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(p) = self.read("logs/nginx.pid").trim().parse() {
                return p;
            }
            assert!(Instant::now() < deadline, "no pid file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.master_pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// What nginx wrote to its error log, checked for crashes.
    pub fn assert_no_crash(&self) {
        let log = self.read("logs/error.log");
        assert!(!log.contains("exited on signal"), "worker crashed:\n{log}");
        assert!(
            !log.contains("[alert]") || !log.contains("panicked"),
            "panic:\n{log}"
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: terminating our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let log = self.read("logs/error.log");
            assert!(!log.contains("exited on signal"), "worker crashed:\n{log}");
        }
    }
}

/// Starts nginx after writing extra files (certificates) into its prefix.
pub fn start_with_files(conf: &str, port: u16, files: &[(&str, &str)]) -> Nginx {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rel, text) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write file");
    }
    Nginx::spawn(dir, conf, port)
}

/// Runs `nginx -t` on a configuration; returns success and what nginx printed.
pub fn nginx_t(conf: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
    std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
    let out = Command::new(nginx_bin())
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .output()
        .expect("run nginx -t");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The proxy lines every WebSocket location needs.
pub fn proxy_to(addr: SocketAddr) -> String {
    format!(
        "proxy_pass http://{addr};\n\
         proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n\
         proxy_set_header Connection \"upgrade\";\n"
    )
}

/// No size limits: the tests send frames larger than tungstenite's defaults.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..Default::default()
    }
}

/// What the echo upstream saw.
#[derive(Default)]
pub struct Seen {
    pub messages: Vec<Message>,
    pub paths: Vec<String>,
    /// Close frames received (code, reason); tungstenite rejects unmasked client frames, so
    /// these were masked.
    pub closes: Vec<(u16, String)>,
    pub pongs: usize,
    pub pings: usize,
}

/// A tokio-tungstenite upstream. By path: `/grow` answers with the message twice over;
/// `/close` answers the first message with Close 4002
/// "server bye"; `/abort` drops the TCP connection after the first message; `/silent` never
/// answers; anything else echoes.
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
}

pub async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_ws(tcp, s.clone()));
        }
    });
    Echo { addr, seen }
}

/// Serves one WebSocket connection on any stream (plain or TLS).
pub async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin>(stream: S, seen: Arc<Mutex<Seen>>) {
    let mut path = String::new();
    // tungstenite's callback signature returns a whole HTTP response as its error type.
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, mut resp: Response| {
        path = req.uri().path().to_string();
        // Select the first subprotocol the client offers, as a real server would.
        let first = req
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string());
        if let Some(p) = first.and_then(|p| p.parse().ok()) {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", p);
        }
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, cb, Some(ws_config())).await
    else {
        return;
    };
    seen.lock().unwrap().paths.push(path.clone());
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                seen.lock().unwrap().messages.push(msg.clone());
                match path.as_str() {
                    "/close" => {
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::from(4002),
                                reason: "server bye".into(),
                            })))
                            .await;
                    }
                    "/abort" => return,
                    "/grow" => {
                        let grown = match &msg {
                            Message::Text(t) => Message::Text(t.repeat(2)),
                            Message::Binary(b) => Message::Binary(b.repeat(2)),
                            _ => unreachable!(),
                        };
                        if ws.send(grown).await.is_err() {
                            return;
                        }
                    }
                    "/silent" => {}
                    _ => {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                seen.lock().unwrap().closes.push((code, reason));
                // tungstenite queues the Close reply; flush it out.
                let _ = ws.flush().await;
            }
            Message::Pong(_) => seen.lock().unwrap().pongs += 1,
            Message::Ping(_) => seen.lock().unwrap().pings += 1,
            _ => {}
        }
    }
}

/// Connects a tokio-tungstenite client.
pub async fn connect(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (ws, resp) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// A TLS connector trusting one (self-signed) certificate.
pub fn tls_trusting(
    der: &tokio_rustls::rustls::pki_types::CertificateDer<'static>,
) -> tokio_tungstenite::Connector {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).expect("certificate");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_tungstenite::Connector::Rustls(Arc::new(cfg))
}

/// Records of one event type.
pub fn of_event<'a>(recs: &'a [Value], event: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["event"] == event).collect()
}

/// True once `n` close records exist.
pub fn closes(n: usize) -> impl Fn(&[Value]) -> bool {
    move |r: &[Value]| of_event(r, "close").len() >= n
}
