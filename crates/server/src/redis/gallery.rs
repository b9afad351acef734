//! The gallery in Redis: every replica saves to and reads from the same images. Each image
//! is a hash (the PNG and what the gallery shows of it); a sorted set orders them. The
//! oldest go once there are more than `--gallery-keep`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::AsyncCommands;

use super::{Conn, Keys};
use crate::gallery::{describe, is_safe_name, Gallery, GalleryItem, GalleryPage};

pub struct RedisGallery {
    conn: Conn,
    keys: Keys,
    keep: usize,
}

impl RedisGallery {
    pub fn new(conn: Conn, keys: Keys, keep: usize) -> Self {
        Self { conn, keys, keep }
    }
}

fn io(e: redis::RedisError) -> std::io::Error {
    std::io::Error::other(e)
}

#[async_trait]
impl Gallery for RedisGallery {
    async fn save(&self, png: Vec<u8>, seed: Option<u64>) -> std::io::Result<String> {
        let mut c = self.conn.clone();
        let n: u64 = c.incr(self.keys.gallery_seq(), 1).await.map_err(io)?;
        // A1111's numbering starts at 00000.
        let n = n - 1;
        let name = match seed {
            Some(s) => format!("{n:05}-{s}.png"),
            None => format!("{n:05}.png"),
        };
        let created = SystemTime::now();
        let item = describe(name.clone(), &png, created);
        let ms = created
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        redis::pipe()
            .atomic()
            .hset_multiple(
                self.keys.output(&name),
                &[
                    ("infotext", item.infotext.clone().unwrap_or_default()),
                    ("width", item.width.to_string()),
                    ("height", item.height.to_string()),
                    ("created", ms.to_string()),
                ],
            )
            .ignore()
            .hset(self.keys.output(&name), "png", png)
            .ignore()
            .zadd(self.keys.gallery(), &name, n)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(io)?;
        // The oldest beyond the limit go (another replica trimming at the same time deletes
        // the same keys: harmless).
        let total: usize = c.zcard(self.keys.gallery()).await.map_err(io)?;
        if total > self.keep {
            let old: Vec<String> = c
                .zrange(self.keys.gallery(), 0, (total - self.keep) as isize - 1)
                .await
                .map_err(io)?;
            let keys: Vec<String> = old.iter().map(|n| self.keys.output(n)).collect();
            redis::pipe()
                .del(keys)
                .ignore()
                .zrem(self.keys.gallery(), &old)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(io)?;
        }
        Ok(name)
    }

    async fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        if !is_safe_name(name) {
            return Ok(None);
        }
        let mut c = self.conn.clone();
        c.hget(self.keys.output(name), "png").await.map_err(io)
    }

    async fn page(&self, page: usize, per_page: usize) -> std::io::Result<GalleryPage> {
        let mut c = self.conn.clone();
        let total: usize = c.zcard(self.keys.gallery()).await.map_err(io)?;
        let start = (page.max(1) - 1).saturating_mul(per_page);
        let names: Vec<String> = if start < total {
            c.zrevrange(
                self.keys.gallery(),
                start as isize,
                start.saturating_add(per_page).min(total) as isize - 1,
            )
            .await
            .map_err(io)?
        } else {
            Vec::new()
        };
        let mut pipe = redis::pipe();
        for n in &names {
            pipe.cmd("HMGET")
                .arg(self.keys.output(n))
                .arg(&["infotext", "width", "height", "created"]);
        }
        let fields: Vec<Vec<Option<String>>> = if names.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut c).await.map_err(io)?
        };
        let items = names
            .into_iter()
            .zip(fields)
            .map(|(name, f)| {
                let get = |i: usize| f.get(i).cloned().flatten();
                let num = |i: usize| get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                GalleryItem {
                    url: format!("/outputs/{name}"),
                    infotext: get(0).filter(|t| !t.is_empty()),
                    width: num(1) as u32,
                    height: num(2) as u32,
                    created: humantime::format_rfc3339_seconds(
                        UNIX_EPOCH + Duration::from_millis(num(3)),
                    )
                    .to_string(),
                    name,
                }
            })
            .collect();
        Ok(GalleryPage {
            items,
            page: page.max(1),
            per_page,
            total,
        })
    }

    fn location(&self) -> String {
        format!("the shared queue ({} gallery)", self.keys.gallery())
    }
}
