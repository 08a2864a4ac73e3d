//! `HTTPS_PROXY` and `NO_PROXY` are honoured for Entra ID and Key Vault: a real HTTP
//! CONNECT proxy on loopback sees the tunnels, or none when the host is exempted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use support::*;

/// A minimal CONNECT proxy; returns its URL and the request lines it saw.
fn connect_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || tunnel(client, &log));
        }
    });
    (url, seen)
}

fn tunnel(client: TcpStream, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    // Skip the rest of the request head.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    log.lock().unwrap().push(first.trim().to_owned());
    let Some(target) = first
        .strip_prefix("CONNECT ")
        .and_then(|r| r.split_whitespace().next())
    else {
        let _ = (&client).write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
        return;
    };
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = (&client).write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    (&client)
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .unwrap();
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = std::io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

#[test]
fn https_proxy_carries_token_and_vault_traffic() {
    let h = Harness::new();
    let v = h.value("proxied");
    h.set("proxied", &v);
    let (proxy, seen) = connect_proxy();
    let done = h
        .cmd(Identity::Workload)
        .secret("proxied")
        .env("HTTPS_PROXY", &proxy)
        .run_once();
    done.assert_success();
    assert_eq!(read(h.out(), "proxied").as_deref(), Some(v.as_str()));
    let vault_host = h.fake.vault_url().trim_start_matches("https://").to_owned();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("CONNECT {vault_host}"))),
        "the proxy saw no tunnel to {vault_host}: {seen:?}"
    );
}

#[test]
fn no_proxy_exempts_the_vault() {
    let h = Harness::new();
    let v = h.value("direct");
    h.set("direct", &v);
    let (proxy, seen) = connect_proxy();
    let done = h
        .cmd(Identity::Workload)
        .secret("direct")
        .env("HTTPS_PROXY", &proxy)
        .env("NO_PROXY", "localhost,127.0.0.1")
        .run_once();
    done.assert_success();
    assert_eq!(read(h.out(), "direct").as_deref(), Some(v.as_str()));
    assert!(
        seen.lock().unwrap().is_empty(),
        "NO_PROXY was ignored: {:?}",
        seen.lock().unwrap()
    );
}
