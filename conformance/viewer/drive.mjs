// Drives OHIF in headless Chromium the way a radiologist opens results, and records what it shows.
//
// Usage: node drive.mjs plan.json   (plan written by check_viewer.py)
// plan: {nodeModules, chromium, baseUrl, studyUID, outDir, timeoutMs, phase: "before"|"after"|"views",
//        sr: [{uid, sop, label}...], seg: [{uid, sop, source, label}...], probes: {SOPInstanceUID: [[column, row]...]},
//        views: [{kind: "PR"|"SC", uid, sop, source, label}...] (phase "views": GSPS and AI overlay SC)}
// Writes <outDir>/<phase>.json with, per opened series: screenshots (with the results drawn and
// with them hidden, same viewport state), the viewport canvas rectangle, the projection of
// probe points from image pixel coordinates to page pixels, OHIF's measurements/segmentations,
// and the console errors raised meanwhile.
import fs from 'fs';
import os from 'os';
import path from 'path';
import { createRequire } from 'module';

const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const require = createRequire(path.join(plan.nodeModules, 'noop.js'));
const { chromium } = require('playwright-core');

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'viewer-chromium-'));
const result = { phase: plan.phase, opened: [], consoleErrors: [], pageErrors: [] };
let context;

// Hard stop: whatever happens, the browser is closed and the process ends.
const killer = setTimeout(async () => {
  result.fatal = `timed out after ${plan.timeoutMs} ms`;
  await finish(3);
}, plan.timeoutMs);

async function finish(code) {
  clearTimeout(killer);
  try { if (context) await context.close(); } catch (e) { /* already gone */ }
  fs.rmSync(userDataDir, { recursive: true, force: true });
  fs.writeFileSync(path.join(plan.outDir, `${plan.phase}.json`), JSON.stringify(result, null, 1));
  process.exit(code);
}

let errorsSinceMark = [];
async function openStudy(page) {
  await page.goto(`${plan.baseUrl}/viewer?StudyInstanceUIDs=${plan.studyUID}`, { timeout: 60000 });
  await page.waitForFunction(() => window.services
    && window.services.displaySetService.getActiveDisplaySets().length > 0
    && window.cornerstone && window.cornerstone.getRenderingEngines().length > 0, null, { timeout: 60000 });
  await waitForImage(page);
  await dismissPopups(page);
}

// The active viewport shows a decoded image (its pixel data is in the cache).
async function waitForImage(page, timeout = 30000) {
  await page.waitForFunction(() => {
    const { viewportGridService, cornerstoneViewportService } = window.services;
    const vp = cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getActiveViewportId());
    const id = vp && vp.getCurrentImageId && vp.getCurrentImageId();
    return Boolean(id && window.cornerstone.cache.getImageLoadObject(id) && vp.getImageData && vp.getImageData());
  }, null, { timeout });
  await page.waitForTimeout(1500);
}

async function dismissPopups(page) {
  // First-run tour and the investigational-use banner cover the image otherwise.
  for (const text of ['Skip all', 'Confirm and hide']) {
    const button = page.getByText(text, { exact: true });
    if (await button.count()) await button.first().click().catch(() => {});
  }
  await page.waitForTimeout(300);
}

// The display set of one result instance (the node puts all SEGs of a study in one series).
async function displaySetId(page, series) {
  return page.evaluate(({ uid, sop }) => {
    const sets = window.services.displaySetService.getActiveDisplaySets().filter(x => x.SeriesInstanceUID === uid);
    const ds = sets.find(x => x.SOPInstanceUID === sop
      || (x.instances || []).some(i => i.SOPInstanceUID === sop)
      || (x.instance && x.instance.SOPInstanceUID === sop));
    return ds ? ds.displaySetInstanceUID : null;
  }, series);
}

// Geometry of the active viewport: its canvas rectangle on the page and the image shown.
async function viewportState(page) {
  return page.evaluate(() => {
    const { viewportGridService, cornerstoneViewportService } = window.services;
    const id = viewportGridService.getActiveViewportId();
    const vp = cornerstoneViewportService.getCornerstoneViewport(id);
    const imageId = vp.getCurrentImageId();
    const inst = window.cornerstone.metaData.get('instance', imageId) || {};
    const r = vp.canvas.getBoundingClientRect();
    return { viewportId: id, imageId, sopInstanceUID: inst.SOPInstanceUID,
             canvas: { left: r.left, top: r.top, width: r.width, height: r.height },
             devicePixelRatio: window.devicePixelRatio };
  });
}

// Image (column,row) points in SCOORD convention -> page CSS pixels, through cornerstone itself.
async function project(page, points) {
  return page.evaluate(pts => {
    const { viewportGridService, cornerstoneViewportService } = window.services;
    const vp = cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getActiveViewportId());
    const imageId = vp.getCurrentImageId();
    const r = vp.canvas.getBoundingClientRect();
    return pts.map(p => {
      const world = window.cornerstone.utilities.imageToWorldCoords(imageId, p);
      const c = vp.worldToCanvas(world);
      return [r.left + c[0], r.top + c[1]];
    });
  }, points);
}

async function setAnnotationsVisible(page, visible) {
  await page.evaluate(v => {
    const ann = window.cornerstoneTools.annotation;
    for (const a of ann.state.getAllAnnotations()) ann.visibility.setAnnotationVisibility(a.annotationUID, v);
    const { viewportGridService, cornerstoneViewportService } = window.services;
    cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getActiveViewportId()).render();
  }, visible);
  await page.waitForTimeout(800);
}

async function setSegmentationsVisible(page, visible) {
  await page.evaluate(v => {
    const { segmentationService, viewportGridService } = window.services;
    const viewportId = viewportGridService.getActiveViewportId();
    for (const s of segmentationService.getSegmentations()) {
      for (const idx of Object.keys(s.segments || {})) {
        segmentationService.setSegmentVisibility(viewportId, s.segmentationId, Number(idx), v, 'Labelmap');
      }
    }
  }, visible);
  await page.waitForTimeout(800);
}

// Poll a page condition, giving up early when the page has reported an error meanwhile.
async function waitUnlessError(page, fn, timeoutMs) {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await page.evaluate(fn).catch(() => false)) return true;
    if (errorsSinceMark.length) { await page.waitForTimeout(1000); return Boolean(await page.evaluate(fn).catch(() => false)); }
    await page.waitForTimeout(250);
  }
  return false;
}

function takeErrors() {
  const e = errorsSinceMark;
  errorsSinceMark = [];
  return e;
}

// Drawn SVG elements (annotations) in the active viewport's overlay layer.
async function svgDrawn(page) {
  return page.evaluate(() => {
    const { viewportGridService, cornerstoneViewportService } = window.services;
    const vp = cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getActiveViewportId());
    const svg = vp && vp.element.querySelector('svg.svg-layer');
    return svg ? svg.querySelectorAll('path, polyline, polygon, ellipse, circle, text, line').length : 0;
  });
}

async function openSR(page, series, index) {
  const entry = { kind: 'SR', description: series.label, seriesInstanceUID: series.uid, sopInstanceUID: series.sop, errors: [] };
  result.opened.push(entry);
  await openStudy(page);
  takeErrors();
  const id = await displaySetId(page, series);
  entry.reachable = Boolean(id);
  if (!id) { entry.errors.push(`OHIF lists no display set for instance ${series.sop} of series ${series.uid}`); return; }
  await page.dblclick(`#thumbnail-${id}`);
  const loaded = await waitUnlessError(page, () => window.cornerstoneTools.annotation.state.getAllAnnotations()
    .some(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay'), 20000);
  entry.loaded = loaded;
  if (!loaded) {
    entry.errors.push('no SR annotation appeared', ...takeErrors());
    entry.screenshot = `sr_${index}_failed.png`;
    await page.screenshot({ path: path.join(plan.outDir, entry.screenshot) });
    return;
  }
  await waitForImage(page);
  await page.mouse.move(5, 880);  // away from the image: no hover highlight
  await page.waitForTimeout(1500);
  // OHIF 3.13 sometimes shows the SR image before it draws the annotations; record whether a
  // radiologist sees them at once, after moving the mouse over the image, or only after a re-render.
  entry.drawn = { asOpened: await svgDrawn(page) };
  entry.screenshotAsOpened = `sr_${index}_as_opened.png`;
  await page.screenshot({ path: path.join(plan.outDir, entry.screenshotAsOpened) });
  if (!entry.drawn.asOpened) {
    const c = (await viewportState(page)).canvas;
    await page.mouse.move(c.left + c.width / 2, c.top + c.height / 2, { steps: 8 });
    await page.mouse.move(5, 880, { steps: 8 });
    await page.waitForTimeout(1000);
    entry.drawn.afterHover = await svgDrawn(page);
    if (!entry.drawn.afterHover) {
      await page.evaluate(() => {
        const { viewportGridService, cornerstoneViewportService } = window.services;
        cornerstoneViewportService.getCornerstoneViewport(viewportGridService.getActiveViewportId()).render();
      });
      await page.waitForTimeout(1000);
      entry.drawn.afterRender = await svgDrawn(page);
    }
  }
  entry.viewport = await viewportState(page);
  // What cornerstone draws: the annotations of the SR viewport, with their text and points.
  entry.annotations = await page.evaluate(() => window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay').map(a => ({
      referencedImageId: a.metadata.referencedImageId || null,
      trackingIdentifier: (a.data && a.data.TrackingIdentifier) || null,
      label: (a.data && a.data.label) || null })));
  entry.screenshot = `sr_${index}.png`;
  await page.screenshot({ path: path.join(plan.outDir, entry.screenshot) });
  await setAnnotationsVisible(page, false);
  entry.screenshotHidden = `sr_${index}_hidden.png`;
  await page.screenshot({ path: path.join(plan.outDir, entry.screenshotHidden) });
  await setAnnotationsVisible(page, true);
  entry.probes = plan.probes && plan.probes[entry.viewport.sopInstanceUID]
    ? await project(page, plan.probes[entry.viewport.sopInstanceUID]) : null;
  entry.errors.push(...takeErrors());
}

async function openSEG(page, series, index) {
  const entry = { kind: 'SEG', description: series.label, seriesInstanceUID: series.uid, sopInstanceUID: series.sop,
                  sourceSOPInstanceUID: series.source || null, errors: [], attempts: [] };
  result.opened.push(entry);
  // OHIF 3.13 sometimes attaches a SEG to the first view of its source series instead of the
  // view it references (when the MG views of one series are separate display sets and the SEG
  // display set is made first); the radiologist then sees no overlay and reopens. Two tries.
  for (let attempt = 0; attempt < 2; attempt++) {
    await openStudy(page);
    takeErrors();
    const id = await displaySetId(page, series);
    entry.reachable = Boolean(id);
    if (!id) { entry.errors.push(`OHIF lists no display set for instance ${series.sop} of series ${series.uid}`); return; }
    await page.dblclick(`#thumbnail-${id}`);
    // OHIF loads the SEG, previews it and asks whether to open it; a radiologist says Yes.
    const loaded = await waitUnlessError(page, () => window.services.segmentationService.getSegmentations().length > 0, 20000);
    const yes = page.getByRole('button', { name: 'Yes', exact: true });
    entry.confirmed = await yes.first().waitFor({ state: 'visible', timeout: loaded ? 8000 : 1000 })
      .then(() => yes.first().click()).then(() => true).catch(() => false);
    if (loaded) await waitForImage(page);
    await page.mouse.move(5, 880);
    await page.waitForTimeout(loaded ? 2000 : 500);
    entry.loaded = loaded;
    entry.viewport = await viewportState(page);
    entry.attempts.push({ loaded, shownSOPInstanceUID: entry.viewport.sopInstanceUID });
    if (!loaded || !series.source || entry.viewport.sopInstanceUID === series.source) break;
  }
  entry.segmentations = await page.evaluate(() => window.services.segmentationService.getSegmentations().map(s => ({
    label: s.label, segments: Object.values(s.segments || {}).filter(Boolean).map(x => x.label) })));
  entry.screenshot = `seg_${index}.png`;
  await page.screenshot({ path: path.join(plan.outDir, entry.screenshot) });
  if (entry.loaded) {
    await setSegmentationsVisible(page, false);
    entry.screenshotHidden = `seg_${index}_hidden.png`;
    await page.screenshot({ path: path.join(plan.outDir, entry.screenshotHidden) });
    await setSegmentationsVisible(page, true);
  }
  entry.probes = plan.probes && plan.probes[entry.viewport.sopInstanceUID]
    ? await project(page, plan.probes[entry.viewport.sopInstanceUID]) : null;
  entry.errors.push(...takeErrors());
}

// A GSPS or an "AI overlay" SC, opened as a radiologist does: double-click its series. Records
// whether OHIF lists it, what the viewport then shows, and a screenshot.
async function openView(page, series, index) {
  const entry = { kind: series.kind, description: series.label, seriesInstanceUID: series.uid,
                  sopInstanceUID: series.sop, sourceSOPInstanceUID: series.source || null, errors: [] };
  result.opened.push(entry);
  await openStudy(page);
  takeErrors();
  entry.displaySet = await page.evaluate(({ uid }) => {
    const d = window.services.displaySetService.getActiveDisplaySets().find(x => x.SeriesInstanceUID === uid);
    return d ? { modality: d.Modality, description: d.SeriesDescription, handler: d.SOPClassHandlerId || null,
                 unsupported: Boolean(d.unsupported), id: d.displaySetInstanceUID } : null;
  }, series);
  entry.reachable = Boolean(entry.displaySet);
  const thumb = entry.displaySet ? page.locator(`#thumbnail-${entry.displaySet.id}`) : null;
  entry.thumbnail = Boolean(thumb && await thumb.count());
  if (entry.thumbnail) {
    await thumb.first().dblclick();
    await page.waitForTimeout(3000);
    await waitForImage(page, 15000).catch(() => {});
  }
  await page.mouse.move(5, 880);
  await page.waitForTimeout(1000);
  entry.viewport = await viewportState(page).catch(() => null);
  entry.drawnSvg = await svgDrawn(page).catch(() => null);
  entry.screenshot = `${series.kind.toLowerCase()}_${index}.png`;
  await page.screenshot({ path: path.join(plan.outDir, entry.screenshot) });
  entry.errors.push(...takeErrors());
}

try {
  fs.mkdirSync(plan.outDir, { recursive: true });
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: plan.chromium,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  page.on('console', async msg => {
    // OHIF reports a crashed view through its error boundary at debug level.
    if (msg.type() !== 'error' && !/Error Boundary/.test(msg.text())) return;
    let text = msg.text();
    for (const arg of msg.args()) {
      const stack = await arg.evaluate(e => (e && e.stack) || null).catch(() => null);
      if (stack) { text += '\n' + stack.split('\n').slice(0, 4).join('\n'); break; }
    }
    errorsSinceMark.push(text);
    result.consoleErrors.push(text);
  });
  page.on('pageerror', e => { errorsSinceMark.push(`pageerror: ${e.message}`); result.pageErrors.push(e.message); });

  if (plan.phase === 'before') {
    await openStudy(page);
    result.viewport = await viewportState(page);
    result.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
      .map(d => ({ modality: d.Modality, description: d.SeriesDescription, images: (d.images || []).length })));
    result.screenshot = 'study_before_results.png';
    await page.screenshot({ path: path.join(plan.outDir, result.screenshot) });
  } else {
    await openStudy(page);
    result.displaySets = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
      .map(d => ({ modality: d.Modality, description: d.SeriesDescription })));
    result.screenshot = plan.phase === 'views' ? 'study_with_views.png' : 'study_with_results.png';
    await page.screenshot({ path: path.join(plan.outDir, result.screenshot) });
    // One failure must not hide the others: record it with a screenshot and go on.
    const steps = [...(plan.sr || []).map((d, i) => [openSR, d, i]), ...(plan.seg || []).map((d, i) => [openSEG, d, i]),
                   ...(plan.views || []).map((d, i) => [openView, d, i])];
    for (const [fn, d, i] of steps) {
      try {
        await fn(page, d, i);
      } catch (e) {
        const entry = result.opened[result.opened.length - 1];
        entry.errors.push(`driver: ${String(e && e.message || e).split('\n')[0]}`, ...takeErrors());
        entry.screenshot = entry.screenshot || `${entry.kind.toLowerCase()}_${i}_failed.png`;
        await page.screenshot({ path: path.join(plan.outDir, entry.screenshot) }).catch(() => {});
      }
    }
  }
  await finish(0);
} catch (e) {
  result.fatal = String(e && e.stack || e);
  await finish(2);
}
