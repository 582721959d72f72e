//! The plain TCP peer `agent bench` measures its reference against: on each connection, a
//! request `[op u8][len u64 LE][each u64 LE]` — op 1: `len` bytes follow, sent as pieces of
//! `each` bytes (0: one piece), each received into memory on its own, answered with one byte
//! once all are in; op 2: `len` bytes of memory sent back. The same bytes the agents move, with
//! nothing of theirs: no keys, no frames, no completions.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use anyhow::{Context, Result};
use clap::Args;

use crate::units::parse_size;

/// Request: receive this many bytes, then answer one.
pub const OP_WRITE: u8 = 1;
/// Request: send this many bytes.
pub const OP_READ: u8 = 2;

#[derive(Debug, Args)]
pub struct SinkArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The memory each connection receives into and sends from.
    #[arg(long, default_value = "64m", value_parser = parse_size)]
    size: u64,
}

pub fn run(a: &SinkArgs) -> Result<()> {
    let l = TcpListener::bind(&a.listen).with_context(|| format!("--listen {}", a.listen))?;
    println!("LISTEN {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let size = usize::try_from(a.size).context("--size")?;
    for s in l.incoming() {
        let s = s?;
        std::thread::spawn(move || {
            if let Err(e) = serve(s, size) {
                eprintln!("dmaplane sink: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream, size: usize) -> Result<()> {
    s.set_nodelay(true)?;
    let mut mem = vec![0u8; size.max(1)];
    let mut req = [0u8; 17];
    loop {
        if let Err(e) = s.read_exact(&mut req) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Ok(());
            }
            return Err(e.into());
        }
        let mut len = u64::from_le_bytes(req[1..9].try_into()?) as usize;
        let each = match u64::from_le_bytes(req[9..17].try_into()?) as usize {
            0 => mem.len(),
            e => e.min(mem.len()),
        };
        match req[0] {
            OP_WRITE => {
                while len > 0 {
                    let n = len.min(each);
                    s.read_exact(&mut mem[..n])?;
                    len -= n;
                }
                s.write_all(&[1])?;
            }
            OP_READ => {
                while len > 0 {
                    let n = len.min(mem.len());
                    s.write_all(&mem[..n])?;
                    len -= n;
                }
            }
            op => anyhow::bail!("unknown request {op}"),
        }
    }
}
