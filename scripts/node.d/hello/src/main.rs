//! hello-rust for scripts/node: logs "hello from rust", answers every HTTP request on :8080 with "hello".
use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    println!("hello from rust");
    let listener = TcpListener::bind("0.0.0.0:8080").expect("bind 0.0.0.0:8080");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    }
}
